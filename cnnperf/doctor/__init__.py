"""The training doctor: trains a CNN, watches it, and explains with evidence what is wrong and what to change."""
