"""Model code `sleb` writes into an output folder beside the weights (loaded with trust_remote_code=True).

These files are copied as they are; they import only torch and transformers, never sleb.
"""
