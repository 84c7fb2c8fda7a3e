"""DPR bi-encoder for the online rewriter: training data (:mod:`offline.dpr.data`) and
training / ONNX export (:mod:`offline.dpr.train`); inference lives in :mod:`rewrite.encoder`."""
