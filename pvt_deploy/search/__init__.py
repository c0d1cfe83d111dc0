"""Search over embeddings (LanceDB): ``EmbeddingIndex.build(embeddings, db)``, ``.search``, ``.duplicates``."""

from pvt_deploy.search.index import EmbeddingIndex, Hit, load_embeddings

__all__ = ["EmbeddingIndex", "Hit", "load_embeddings"]
