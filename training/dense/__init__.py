"""Dense downstream tasks: segmentation and detection heads on the CAE encoder, their data and metrics."""
