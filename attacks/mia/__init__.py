"""Membership inference attacks, one algorithm per file, registered in :data:`attacks.base.MIA`."""
