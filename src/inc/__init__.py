"""Intel Neural Compressor (INC 2.6): the deploy.yaml schema and the post-training quantization run.

Everything that imports ``neural_compressor`` lives in this package, and nothing else does, so that moving to stock
TensorFlow + INC 3.x stays a local change. Importing ``medq.inc`` or ``medq.inc.deploy`` does not import INC (it
takes ~15 s and changes ``yaml.SafeLoader`` globally); only :mod:`medq.inc.ptq` does, inside its functions.

- ``medq.inc.deploy``: ``load_deploy(path) -> DeployConfig``. deploy.yaml parsed (repeated keys reported),
  validated against INC 2.6's yaml schema with one clear line per wrong key or value, INC's defaults listed.
- ``medq.inc.ptq``: ``run_ptq(...) -> PtqResult``. Every deploy.yaml value mapped onto ``PostTrainingQuantConfig``
  and ``quantization.fit``; INC's log to a file; what INC received and decided (trials, op table, ops left out of
  INT8) recorded. ``check_with_inc(deploy)`` runs INC's own schema over the file.
- ``medq.inc.rewrite``: ``rewrite_int8_concat(graph_def) -> (graph_def, RewriteReport)``. INC's INT8 graph with
  DenseNet's concatenations, and the BatchNorm+ReLU that read them, moved into INT8 (INC 2.6 leaves them in FP32);
  the quantize stage keeps the result only when it meets deploy.yaml's accuracy criterion. One pass per module
  (``pad``, ``concat``, ``fold``) over one ``graph.GraphView``.
"""
