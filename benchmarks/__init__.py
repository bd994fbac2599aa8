"""Side-by-side benchmarks of vafunc against torchvision (run: ``python -m benchmarks --help``)."""
