"""The finished force field: ASE calculator, evaluation on any reader format, MD, metrics and plots."""
