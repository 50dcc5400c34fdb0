"""The generation loop torchfx_eff.optimize() owns (arrives with the decoding issue)."""
