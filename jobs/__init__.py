"""GPU and background work: RunPod, pod training script, judge, deploy, nightly."""
