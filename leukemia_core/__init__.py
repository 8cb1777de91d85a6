"""Core library of the leukemia and white-blood-cell image analysis book."""
__version__ = "0.1.0"
