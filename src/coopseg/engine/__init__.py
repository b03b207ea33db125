"""Training, evaluation, prediction and profiling."""
