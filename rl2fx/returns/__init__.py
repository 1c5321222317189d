"""Stateless advantage and return estimators over ``[*batch, time]`` tensors."""
