"""sere-dist: SERE similarity-based expert re-routing for MoE serving on Ray and vLLM."""

__version__ = "0.1.0"
