"""Several processes: a master that listens and delivers, workers that run the sessions."""
