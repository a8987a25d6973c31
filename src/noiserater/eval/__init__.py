"""Sample-quality measurement, one module per idea (``noiserater.evaluate`` evaluates a checkpoint with them):

- :mod:`.frechet`: the Frechet distance and k-NN precision/recall between feature sets;
- :mod:`.inception`: the InceptionV3 FID network, loaded from a local weights file;
- :mod:`.classifier`: the per-dataset classifier ("classifier FID") and its training loop;
- :mod:`.extractors`: feature extractors (classifier, inception) and the 8-bit quantisation of images;
- :mod:`.reference`: which reference images, and their feature statistics cached on disk;
- :mod:`.cache`: the cache folder and the file names of data sources in it.

Layers import downward only: frechet, inception and cache import nothing of the package; classifier
imports cache; extractors imports classifier and inception; reference imports extractors. None of them
imports ``noiserater.evaluate``.
"""
