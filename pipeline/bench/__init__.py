"""The benchmark suite (`cmd-pipeline bench`): hardware limits, throughput, growth, baselines."""
