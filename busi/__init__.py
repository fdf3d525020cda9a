"""busi: train, evaluate and use breast-ultrasound classifiers (normal, benign, malignant) with honest numbers."""

__version__ = "0.1.0"
