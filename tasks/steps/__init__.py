"""The preprocessing steps, one module each (the work and its Step class); pipeline.py lists them per profile."""
