"""Fitting alpha and beta (spec section 3): numpy core, Ray around it, JSON result."""
