"""sigscale.eval"""
