"""Build-time tools: fetch the model folder into the image, deploy the image to RunPod."""
