"""A small Keras MLP for scikit-learn's digits as a fedfleet task (see ``digits_mlp.task``)."""
