"""What the search API takes and answers: request and response models, and the limits they enforce.

A hit is the store's own `Hit` (search.query.searcher), not a copy of its fields: a field added there
is answered and documented at once. NaN, Infinity and 1e400 (read as inf) are refused wherever a
number goes (`allow_inf_nan=False`): a bucket edge of inf made null edges and a NaN one negative counts.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator

from search.merge import MAX_FACET_VALUES
from search.query.searcher import Hit

__all__ = ["DEFAULT_EF_SEARCH", "MAX_EF_SEARCH", "MAX_FACET_LIMIT", "MAX_PAGE_DEPTH", "MAX_SIMILAR_K", "ErrorResponse",
           "FacetCount", "Health", "ProductVector", "SearchRequest", "SearchResponse", "SimilarCandidates", "SimilarHit",
           "SimilarRequest", "WholeNumber", "EmbedRequest", "QueryVectorAnswer"]

DEFAULT_EF_SEARCH = 256
MAX_EF_SEARCH = 20_000  # search breadth a request may ask for
MAX_SIMILAR_K = 100  # similar products a request may ask for
MAX_PAGE_DEPTH = 1000  # offset + k: deeper pages than a shopper reads cost every shard that many results
MAX_FACET_LIMIT = 100_000  # values per facet a router may ask each backend for, to add up exactly


def _digits(value: Any) -> Any:
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number, like 10")
    return value


# A whole number in a query string: `k=2.0` or `k=true` is as wrong there as `"k": 2.0` in a body.
WholeNumber = Annotated[int, BeforeValidator(_digits)]
# A query vector: numbers only (a string or a boolean is a mistake, not a number), all finite.
QueryVector = list[Annotated[float, Strict()]]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(None, max_length=10_000, description="a text query (needs the index's model)")
    vector: QueryVector | None = Field(None, description="a query vector of the index's dimension; with `text` "
                                                         "or `image_url`, their vector (search.router embeds a query "
                                                         "once and sends the vector to every backend)")
    vector_model: str | None = Field(None, max_length=512, description="the model id `vector` comes from: an index "
                                                                       "of another model embeds the text or image "
                                                                       "itself, and refuses a vector alone")
    image_url: str | None = Field(None, max_length=4096, description="an image to search by (needs the model)")
    k: int = Field(10, ge=1, le=1000, strict=True, description="results wanted (the page size)")
    ef_search: int = Field(DEFAULT_EF_SEARCH, ge=1, le=MAX_EF_SEARCH, strict=True,
                           description="search breadth, independent of k: HNSW's efSearch; for the "
                                       "compressed kinds also the candidates re-scored exactly")
    shop_id: str | None = Field(None, max_length=256, description="only this shop's products")
    offset: int = Field(0, ge=0, strict=True, description="results to skip (a page is offset..offset+k; "
                                                          f"offset + k at most {MAX_PAGE_DEPTH})")
    filter: dict | None = Field(None, description="attribute conditions the results meet (search.filters): "
                                                  '{"brand": "acme", "price": {"gte": 10, "lt": 50}, '
                                                  '"or": [...]}, on the index\'s filterable fields')
    facets: list[str] = Field([], max_length=16, description="fields to count the filtered matches by")
    facet_buckets: dict[str, list[float]] = Field({}, description="numeric facets: bucket edges per field, "
                                                                   "e.g. {\"price\": [0, 25, 50, 100]}")
    facet_limit: int = Field(MAX_FACET_VALUES, ge=1, le=MAX_FACET_LIMIT, strict=True,
                             description="values listed per facet, the most frequent (search.router asks each "
                                         "backend for all of them, to add them up exactly)")
    mode: Literal["vector", "lexical", "hybrid"] | None = Field(
        None, description="vector: by embedding; lexical: by keywords (BM25); hybrid: both, fused by "
                          "reciprocal rank (default for text queries; vector for the others)")
    lexical_weight: float = Field(1.0, ge=0, le=10, description="hybrid: the keyword list's weight in the "
                                                               "fusion (the vector list's is 1)")
    fusion_window: int | None = Field(None, ge=1, le=MAX_PAGE_DEPTH, strict=True,
                                      description="hybrid: how deep each list goes into the fusion (default "
                                                  "max(100, k)); pages of one page size run through one fused "
                                                  "list, so they never repeat or skip a product")

    @model_validator(mode="after")
    def one_query(self):
        given = [name for name in ("text", "vector", "image_url") if getattr(self, name) is not None]
        with_vector = self.vector_model is not None and len(given) == 2 and "vector" in given
        if len(given) != 1 and not with_vector:
            raise ValueError(f"give exactly one of text, vector, image_url (got {', '.join(given) or 'none'}); "
                             f"a text or an image may come with its vector and vector_model")
        if self.mode in ("lexical", "hybrid") and self.text is None:
            raise ValueError(f"mode {self.mode} needs a text query")
        if self.offset + self.k > MAX_PAGE_DEPTH:
            raise ValueError(f"offset + k is {self.offset + self.k}, over {MAX_PAGE_DEPTH}")
        return self

    @property
    def search_mode(self) -> str:
        return self.mode or ("hybrid" if self.text is not None else "vector")

    @property
    def kind(self) -> str:
        """What the query is made of, as metrics count it: text, image or vector."""
        return "text" if self.text is not None else "image" if self.image_url is not None else "vector"


@dataclasses.dataclass(frozen=True)
class SimilarHit(Hit):
    vector: list[float] = dataclasses.field(default_factory=list)  # the product's stored vector


class SimilarCandidates(BaseModel):
    results: list[SimilarHit]
    mode: str = "vector"
    model: str = ""
    took_ms: float
    shards: list[int] = Field([], description="the index's shards that answered (search.router checks that no "
                                               "shard is counted twice)")


class SimilarRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    vector: QueryVector = Field(description="the product's stored vector (GET /v1/products/{id}/vector)")
    exclude: str = Field("", max_length=256, description="the product itself, left out")
    k: int = Field(10, ge=1, le=MAX_SIMILAR_K, strict=True)
    ef_search: int = Field(DEFAULT_EF_SEARCH, ge=1, le=MAX_EF_SEARCH, strict=True)
    shop_id: str | None = Field(None, max_length=256)
    filter: dict | None = None


class ProductVector(BaseModel):
    product_id: str
    vector: list[float]
    model: str = Field("", description="the model id of the vector's index")


class QueryVectorAnswer(BaseModel):
    vector: list[float]
    model: str = Field(description="the model id of the vector (the index's)")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=10_000)
    image_url: str | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def one_query(self):
        if (self.text is None) == (self.image_url is None):
            raise ValueError("give exactly one of text, image_url")
        return self


class FacetCount(BaseModel):
    value: Any = Field(description="a field value, or for a numeric facet the bucket [from, to)")
    count: int


class SearchResponse(BaseModel):
    results: list[Hit] = Field(description="score: in vector mode the cosine similarity to the query; lexical, "
                                           "BM25; hybrid, the reciprocal-rank-fusion score. generation: the commit "
                                           "generation of the shard that served the hit")
    facets: dict[str, list[FacetCount]] = Field({}, description="per facet field, exact counts of the matches "
                                                                "(values by count; buckets in order)")
    mode: str = Field("vector", description="how the results were ranked")
    model: str = Field("", description="the model id of the index that answered (search.aliases: it changes "
                                       "when the alias moves to an index of another model)")
    index: str = Field("", description="the name of the index that answered, when the service follows an alias")
    took_ms: float
    partial: bool = Field(False, description="true when some shards did not answer (search.router): the "
                                             "results are the best of the others")
    missing_shards: list[int] = Field([], description="the shards whose results are missing")
    shards: list[int] = Field([], description="the index's shards that answered: a service's own, or through "
                                               "search.router every backend's (it checks that none is counted twice)")
    errors: dict[str, str] = Field({}, description="search.router: why each backend whose answer is missing failed")


class ErrorResponse(BaseModel):
    error: str


class Health(BaseModel):
    status: str = Field(description="ok; degraded: a shard's newest generation failed to load (the last good one "
                                    "serves); unavailable (a 503): the engine that holds the index does not answer "
                                    "(Qdrant), `errors` says why")
    model: str
    dim: int
    index: str = Field("", description="the index served, when the service follows an alias (--alias)")
    live_docs: int
    generation: int = Field(description="the generation served (summed over shards)")
    num_shards: int
    shards: list[int] = Field(description="the index's shards this service serves")
    queries: list[str] = Field(description="the query kinds this service answers")
    filterable: list[str] = Field([], description="the index's filterable fields (name or name:type)")
    errors: dict[str, str] = Field({}, description="shard → why its newest generation is not served")
    features: list[str] = Field(["embed"], description="what search.router may ask of this service: `embed`, "
                                                       "a query embedded once (POST /v1/embed) and its vector sent "
                                                       "with the query (`vector_model`)")
