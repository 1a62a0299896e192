"""Server side: pure aggregation math, update validation and the Flower strategy."""
