"""medblip-eval: a bundle's diagnostic performance on a site's own labelled cohort, with confidence intervals."""
