"""Generative models for minority-class synthesis (R3GAN) and provenance of their samples."""
