"""Data: case discovery for training (prepare), the disk cache, the training transforms and the phantom generator."""
