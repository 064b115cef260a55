"""sigscale.curation"""
