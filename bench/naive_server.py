"""The naive Recommend server a team would write first: the reference the product must beat.

A synchronous grpc.server on a thread pool. Per request: Feast get_online_features for the user
(propensity_user_v1), candidates from a catalog built once at start-up (only to know which
items), then Feast get_online_features for every candidate item (propensity_item_v1, one call),
a per-request Catalog.from_frame, pandas DataFrames for both models and Booster.predict with
LightGBM's defaults. Same store, same model files and the project's own assembly code as the
real server, so the difference is the serving design, not the inputs.

    python -m bench.naive_server --port 50061   (PROPENSITY_* env chooses the shop)
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
import warnings
from concurrent import futures

import grpc
import lightgbm as lgb
import numpy as np
import pandas as pd
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES, pair_matrix, user_vector
from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.settings import Settings
from propensity.user_state import UserState
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc


class NaiveRecommender(pb_grpc.RecommendationServiceServicer):
    def __init__(self, settings: Settings) -> None:
        from feast import FeatureStore

        self.settings = settings
        self.store = FeatureStore(repo_path=str(settings.feature_repo))
        item_ids = pd.read_parquet(settings.offline_dir / "item_stats.parquet", columns=["item_id"])["item_id"].astype(str).unique().tolist()
        # Services resolved once (resolving one per request costs ~17 ms in Feast 0.67: too naive to be fair).
        self.user_service = self.store.get_feature_service(settings.user_feature_service)
        self.item_service = self.store.get_feature_service(settings.item_feature_service)
        rows = self.store.get_online_features(features=self.item_service, entity_rows=[{"item_id": i} for i in item_ids]).to_df()
        self.start_catalog = Catalog.from_frame(rows)  # only to decide which items are candidates
        version = (settings.model_dir / "CURRENT").read_text().strip()
        directory = settings.model_dir / "versions" / version
        self.version = version
        self.user_model = lgb.Booster(model_file=str(directory / "user_propensity.txt"))
        self.ranker = lgb.Booster(model_file=str(directory / "item_ranker.txt"))

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RecommendResponse:
        k = request.num_items or 10
        user_cols = self.store.get_online_features(features=self.user_service, entity_rows=[{"user_id": request.user_id}]).to_dict()
        row = {name: values[0] for name, values in user_cols.items()}
        user = UserState.from_row(request.user_id, row, self.start_catalog)
        idx = generate_candidates(user, self.start_catalog, self.settings.candidates).item_idx
        if not len(idx):
            idx = self.start_catalog.popular_order[: self.settings.candidates.max_candidates]
        item_ids = [str(i) for i in self.start_catalog.item_ids[idx]]
        items = self.store.get_online_features(features=self.item_service, entity_rows=[{"item_id": i} for i in item_ids]).to_df()
        catalog = Catalog.from_frame(items)
        user = UserState.from_row(request.user_id, row, catalog)
        now = time.time()
        user_row = user_vector(user, now)
        propensity = float(self.user_model.predict(pd.DataFrame([user_row], columns=list(USER_MODEL_FEATURES)))[0])
        frame = pd.DataFrame(pair_matrix(user, catalog, catalog.lookup(item_ids), now, user_row=user_row), columns=list(RANKER_FEATURES))
        scores = self.ranker.predict(frame)
        top = np.argsort(-scores, kind="stable")[:k]
        return pb.RecommendResponse(
            user_id=request.user_id,
            purchase_propensity=propensity,
            items=[pb.RankedItem(item_id=item_ids[i], score=float(scores[i]), rank=r) for r, i in enumerate(top, start=1)],
            model_version=self.version,
            feature_service=self.settings.user_feature_service,
            item_feature_service=self.settings.item_feature_service,
        )


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads))
    pb_grpc.add_RecommendationServiceServicer_to_server(NaiveRecommender(Settings()), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"naive server on 127.0.0.1:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
