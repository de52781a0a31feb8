"""The rnnjax benchmark suite (``rnnjax-bench``): rnnjax against its peers, interleaved, as ratios."""
