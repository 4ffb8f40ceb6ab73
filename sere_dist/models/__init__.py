"""The small MoE checkpoints sere-dist builds and trains itself (no model hub here)."""
