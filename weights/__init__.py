"""The weight store and checkpoint formats, in plain data (config dicts + canonical state dicts).

``store`` (the models dir, atomic writes, manifests), ``names`` (name tables), ``hf``, ``openai_tf``, ``gguf``
(format readers/writers, heavy libraries imported lazily), ``adapters`` (PEFT folders), ``fetch`` (known models),
and the ``python -m weights`` CLI. Nothing here imports ``engine``.
"""
