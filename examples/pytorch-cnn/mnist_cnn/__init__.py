"""A small PyTorch CNN for MNIST as a fedfleet task (see ``mnist_cnn.task``)."""
