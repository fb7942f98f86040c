"""The engine's core: the array backend (NumPy or CuPy), Blob, the Layer base class and its registry,
fillers, and where shipped model files are found. Everything above (kernels, layers, net, solvers) builds
on these; nothing here imports from those packages."""
