"""The running daemon: the composition root, workers, reload, drain and log observers."""
