"""What train.py, the playground CLI, trains: the CNNs, the datasets, sweeps."""
