"""A synthetic labelled cohort with a known answer: variants of the real MNI T1 with a planted ventricle change."""
