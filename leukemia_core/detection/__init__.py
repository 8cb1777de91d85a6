"""WBC detection with morphological attributes, trained from sparse annotations."""
