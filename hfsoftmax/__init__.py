"""hfsoftmax: training classifiers with millions of classes by HF-Softmax.

Zhang, Yang, Yan, Lin, "Accelerated Training for Massive Classification via Dynamic Class
Selection", AAAI 2018 (arXiv 1801.01687). Heavy submodules are imported on use, so
``import hfsoftmax`` stays fast.
"""
__version__ = "0.1.0"
