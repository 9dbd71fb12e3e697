"""tritondrr (package exports land once every module is in)."""
