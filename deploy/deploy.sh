#!/usr/bin/env bash
# Deploys the product-embeddings pipelines to Google Cloud. Every command is printed before it
# runs; DRY_RUN=1 prints them and runs nothing (no gcloud needed). Settings come from the
# environment or from .env at the repository root (see docs/DEPLOY.md).
#
#   deploy/deploy.sh infra            topics, subscriptions (with dead-letter policy), dataset and
#                                     tables, bucket, Artifact Registry, worker service account + roles
#   deploy/deploy.sh build-image      the worker/launcher image, with Cloud Build
#   deploy/deploy.sh build-templates  Flex Template specs for the embed and index pipelines
#   deploy/deploy.sh stage-model      copy model weights to the bucket (MODEL_FILE=...)
#   deploy/deploy.sh launch-embed     the streaming embed job on Dataflow, GPU workers
#   deploy/deploy.sh launch-index     the streaming index job on Dataflow: commits per shard to gs://BUCKET/index
#   deploy/deploy.sh launch-search    search replicas, a managed instance group per shard group behind an
#                                     internal load balancer, and the router in front of them; they serve
#                                     the index the alias `live` of INDEX_ROOT names (set to INDEX_NAME if unset)
#   deploy/deploy.sh rollout          a new model (MODEL, PROJECTION) as index INDEX_NAME: its topic and
#                                     subscriptions, its index job, the re-embed backfill (docs/DEPLOY.md §5)
#   deploy/deploy.sh rollout-stream   then its streaming embed job, on the changes its subscription held
#   deploy/deploy.sh rollout-switch   then the gate, the alias switch (from SERVING_NAME), and OLD_JOBS drained
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .env ]]; then set -a; source .env; set +a; fi

: "${PROJECT:?set PROJECT (the Google Cloud project id), e.g. in .env}"
REGION="${REGION:-us-central1}"
ZONE="${ZONE:-${REGION}-a}"
BUCKET="${BUCKET:-${PROJECT}-product-embeddings}"
REPOSITORY="${REPOSITORY:-product-embeddings}"
IMAGE_TAG="${IMAGE_TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}"
IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/${REPOSITORY}/worker:${IMAGE_TAG}}"
DATASET="${DATASET:-product_embeddings}"
SERVICE_ACCOUNT_NAME="${SERVICE_ACCOUNT_NAME:-product-embeddings-worker}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT_NAME}@${PROJECT}.iam.gserviceaccount.com"
EVENTS_TOPIC="${EVENTS_TOPIC:-product-events}"
EMBEDDINGS_TOPIC="${EMBEDDINGS_TOPIC:-product-embeddings}"
DLQ_TOPIC="${DLQ_TOPIC:-product-events-dlq}"
EMBED_SUBSCRIPTION="${EMBED_SUBSCRIPTION:-product-events-embed}"
INDEX_SUBSCRIPTION="${INDEX_SUBSCRIPTION:-product-embeddings-index}"
MODEL="${MODEL:-packaged:effnet-lite0+minilm}"
PROJECTION="${PROJECTION:-}"  # a top-tuned head on gs:// (evaluation.run writes one); empty: none
GPU_TYPE="${GPU_TYPE:-nvidia-tesla-t4}"
MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-8}"
HARNESS_THREADS="${HARNESS_THREADS:-4}"
MAX_WORKERS="${MAX_WORKERS:-10}"
MAX_CONCURRENT_DOWNLOADS="${MAX_CONCURRENT_DOWNLOADS:-16}"
NUM_SHARDS="${NUM_SHARDS:-4}"
SEGMENT_KIND="${SEGMENT_KIND:-hnsw}"  # a new index's kind: hnsw, hnsw_sq8 or ivf_pq (docs/DEPLOY.md §7)
IVF_NPROBE="${IVF_NPROBE:-32}"  # ivf_pq only: lists probed per search, fixed when the index is made
FILTERABLE="${FILTERABLE:-}"  # attributes queries filter and facet on, e.g. brand,category,price:float (fixed when made)
INDEX_ROOT="${INDEX_ROOT:-gs://${BUCKET}/indexes}"  # named indexes and aliases.json (python -m search.aliases)
INDEX_NAME="${INDEX_NAME:-v1}"  # the index a launch builds; `rollout` builds a new one (e.g. v2) beside it
INDEX_DIR="${INDEX_DIR:-${INDEX_ROOT}/${INDEX_NAME}}"
SERVING_NAME="${SERVING_NAME:-}"  # rollout-switch: the index the alias names now (the gate compares with it)
OLD_JOBS="${OLD_JOBS:-}"  # rollout-switch: the old model's Dataflow job ids to drain, comma-separated
INDEX_MACHINE_TYPE="${INDEX_MACHINE_TYPE:-n2-highmem-8}"  # index workers: the shards they own are held in memory
INDEX_MAX_WORKERS="${INDEX_MAX_WORKERS:-${NUM_SHARDS}}"
INDEX_DISK_GB="${INDEX_DISK_GB:-200}"
SINK="${SINK:-faiss}"  # launch-index: faiss (the sharded index on the bucket) or qdrant (docs/DEPLOY.md §9)
COLLECTION="${COLLECTION:-products-${INDEX_NAME}}"  # SINK=qdrant: the collection the index job writes
QDRANT_URL="${QDRANT_URL:-}"  # SINK=qdrant: https://HOST:6333 (Qdrant Cloud, or the Helm release's service)
QDRANT_API_KEY_SECRET="${QDRANT_API_KEY_SECRET:-projects/${PROJECT}/secrets/qdrant-api-key}"
QDRANT_WORKERS="${QDRANT_WORKERS:-2}"  # SINK=qdrant: Dataflow workers (the engine shards; the job only writes)
QDRANT_SHARDS="${QDRANT_SHARDS:-6}"  # SINK=qdrant, a new collection: shards, a multiple of the nodes (docs/DEPLOY.md §9)
QDRANT_REPLICATION="${QDRANT_REPLICATION:-2}"  # SINK=qdrant, a new collection: copies of each shard
SHARDS_PER_REPLICA="${SHARDS_PER_REPLICA:-2}"
SEARCH_MACHINE_TYPE="${SEARCH_MACHINE_TYPE:-n2-highmem-8}"
SEARCH_REPLICAS="${SEARCH_REPLICAS:-2}"  # instances per shard group
ROUTER_MACHINE_TYPE="${ROUTER_MACHINE_TYPE:-n2-standard-4}"
ROUTER_REPLICAS="${ROUTER_REPLICAS:-2}"
SEARCH_DISK_GB="${SEARCH_DISK_GB:-200}"
ROUTER_DISK_GB="${ROUTER_DISK_GB:-20}"
NETWORK="${NETWORK:-default}"
SUBNET="${SUBNET:-default}"
VPC_RANGES="${VPC_RANGES:-10.0.0.0/8}"  # who may call the replicas and the router (the subnets' ranges)
JOB_SUFFIX="${JOB_SUFFIX:-$(date -u +%Y%m%d-%H%M%S)}"
TEMPLATES="gs://${BUCKET}/templates"

positive() {  # refuses a setting that is not a whole number >= 1, before anything is created
  [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || { echo "deploy.sh: $1 must be a whole number >= 1, not '${!1}'" >&2; exit 2; }
}

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ "${DRY_RUN:-0}" == "1" ]] || "$@"
}

# Runs the create command only when the describe command says the resource is missing.
ensure() {
  local describe=() create=()
  while [[ "$1" != "--" ]]; do describe+=("$1"); shift; done; shift
  create=("$@")
  if [[ "${DRY_RUN:-0}" != "1" ]] && "${describe[@]}" >/dev/null 2>&1; then
    echo "= exists: ${describe[*]:0:4} ..."
  else
    run "${create[@]}"
  fi
}

# grant topics|subscriptions NAME publisher|subscriber: the worker account's role on that one resource.
grant() {
  run gcloud pubsub "$1" add-iam-policy-binding "$2" --project="$PROJECT" \
    --member="serviceAccount:${SERVICE_ACCOUNT}" --role="roles/pubsub.$3"
}

infra() {
  run gcloud services enable dataflow.googleapis.com pubsub.googleapis.com bigquery.googleapis.com \
    artifactregistry.googleapis.com cloudbuild.googleapis.com compute.googleapis.com --project="$PROJECT"
  ensure gcloud storage buckets describe "gs://${BUCKET}" -- \
    gcloud storage buckets create "gs://${BUCKET}" --project="$PROJECT" --location="$REGION" --uniform-bucket-level-access
  ensure gcloud artifacts repositories describe "$REPOSITORY" --location="$REGION" --project="$PROJECT" -- \
    gcloud artifacts repositories create "$REPOSITORY" --repository-format=docker --location="$REGION" --project="$PROJECT"
  for topic in "$EVENTS_TOPIC" "$EMBEDDINGS_TOPIC" "$DLQ_TOPIC"; do
    ensure gcloud pubsub topics describe "$topic" --project="$PROJECT" -- \
      gcloud pubsub topics create "$topic" --project="$PROJECT" --message-retention-duration=7d
  done
  # Messages Dataflow cannot take after 10 attempts go to the dead-letter topic, not into a loop.
  ensure gcloud pubsub subscriptions describe "$EMBED_SUBSCRIPTION" --project="$PROJECT" -- \
    gcloud pubsub subscriptions create "$EMBED_SUBSCRIPTION" --project="$PROJECT" --topic="$EVENTS_TOPIC" \
      --ack-deadline=600 --message-retention-duration=7d --dead-letter-topic="$DLQ_TOPIC" --max-delivery-attempts=10
  ensure gcloud pubsub subscriptions describe "$INDEX_SUBSCRIPTION" --project="$PROJECT" -- \
    gcloud pubsub subscriptions create "$INDEX_SUBSCRIPTION" --project="$PROJECT" --topic="$EMBEDDINGS_TOPIC" \
      --ack-deadline=600 --message-retention-duration=7d --dead-letter-topic="$DLQ_TOPIC" --max-delivery-attempts=10
  local schemas; schemas="$(mktemp -d)"
  run "${PYTHON:-python}" -m deploy.bigquery_schemas "$schemas" "${PROJECT}:${DATASET}"
  ensure bq --project_id="$PROJECT" show "${PROJECT}:${DATASET}" -- \
    bq --project_id="$PROJECT" --location="$REGION" mk --dataset "${PROJECT}:${DATASET}"
  ensure bq --project_id="$PROJECT" show "${PROJECT}:${DATASET}.product_embeddings" -- \
    bq --project_id="$PROJECT" mk --table --time_partitioning_type=DAY --time_partitioning_field=embedded_at \
      --clustering_fields=product_id "${PROJECT}:${DATASET}.product_embeddings" "${schemas}/product_embeddings.json"
  ensure bq --project_id="$PROJECT" show "${PROJECT}:${DATASET}.dead_letter" -- \
    bq --project_id="$PROJECT" mk --table --time_partitioning_type=DAY --time_partitioning_field=failed_at \
      --clustering_fields=product_id "${PROJECT}:${DATASET}.dead_letter" "${schemas}/dead_letter.json"
  # Each product's source state, one row per event (what a new model is re-embedded from), and the
  # view of its current state (docs/DEPLOY.md §5).
  ensure bq --project_id="$PROJECT" show "${PROJECT}:${DATASET}.product_state" -- \
    bq --project_id="$PROJECT" mk --table --time_partitioning_type=DAY --time_partitioning_field=recorded_at \
      --clustering_fields=product_id "${PROJECT}:${DATASET}.product_state" "${schemas}/product_state.json"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    run bq --project_id="$PROJECT" query --use_legacy_sql=false "<${schemas}/product_state_latest.sql>"
  else
    run bq --project_id="$PROJECT" query --use_legacy_sql=false "$(cat "${schemas}/product_state_latest.sql")"
  fi
  ensure gcloud iam service-accounts describe "$SERVICE_ACCOUNT" --project="$PROJECT" -- \
    gcloud iam service-accounts create "$SERVICE_ACCOUNT_NAME" --project="$PROJECT" \
      --display-name="product-embeddings Dataflow workers"
  # Least privilege; docs/DEPLOY.md says why each role is needed.
  for role in roles/dataflow.worker roles/artifactregistry.reader roles/logging.logWriter roles/monitoring.metricWriter \
      roles/bigquery.readSessionUser; do
    run gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:${SERVICE_ACCOUNT}" \
      --role="$role" --condition=None
  done
  grant subscriptions "$EMBED_SUBSCRIPTION" subscriber
  grant subscriptions "$INDEX_SUBSCRIPTION" subscriber
  grant topics "$EMBEDDINGS_TOPIC" publisher
  grant topics "$DLQ_TOPIC" publisher
  run gcloud storage buckets add-iam-policy-binding "gs://${BUCKET}" \
    --member="serviceAccount:${SERVICE_ACCOUNT}" --role=roles/storage.objectAdmin
  run bq --project_id="$PROJECT" add-iam-policy-binding --member="serviceAccount:${SERVICE_ACCOUNT}" \
    --role=roles/bigquery.dataEditor "${PROJECT}:${DATASET}"
  if [[ "$SINK" == "qdrant" ]]; then  # the workers read the API key, and only that secret (docs/DEPLOY.md §9)
    run gcloud secrets add-iam-policy-binding "${QDRANT_API_KEY_SECRET##*/secrets/}" --project="$PROJECT" \
      --member="serviceAccount:${SERVICE_ACCOUNT}" --role=roles/secretmanager.secretAccessor
  fi
}

build_image() {
  run gcloud builds submit --project="$PROJECT" --region="$REGION" \
    --config=deploy/cloudbuild.yaml --substitutions="_IMAGE=${IMAGE}" .
}

build_templates() {
  run "${PYTHON:-python}" -m deploy.flex_templates
  for kind in embed index; do
    run gcloud dataflow flex-template build "${TEMPLATES}/${kind}.json" --project="$PROJECT" \
      --image="$IMAGE" --sdk-language=PYTHON --metadata-file="deploy/templates/${kind}-metadata.json" \
      --env="FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/embed/pipelines/${kind}.py"
  done
}

stage_model() {
  : "${MODEL_FILE:?set MODEL_FILE to a local checkpoint (e.g. an open_clip .pt) to copy to the bucket}"
  run gcloud storage cp "$MODEL_FILE" "gs://${BUCKET}/models/$(basename "$MODEL_FILE")"
  echo "then launch with MODEL=open_clip:ARCH/gs://${BUCKET}/models/$(basename "$MODEL_FILE")"
}

# A streaming job from a Flex Template: KIND, worker machine, max workers, the template's
# parameters (`~`-separated), then any extra gcloud flags. Both jobs run the worker image.
flex_run() {
  local kind="$1" machine="$2" max_workers="$3" parameters="$4"; shift 4
  run gcloud dataflow flex-template run "${kind}-${JOB_SUFFIX}" --project="$PROJECT" --region="$REGION" \
    --template-file-gcs-location="${TEMPLATES}/${kind}.json" \
    --service-account-email="$SERVICE_ACCOUNT" \
    --temp-location="gs://${BUCKET}/tmp" --staging-location="gs://${BUCKET}/staging" \
    --worker-machine-type="$machine" --max-workers="$max_workers" --enable-streaming-engine \
    --additional-experiments="use_runner_v2" "$@" \
    --additional-user-labels="app=product-embeddings" \
    --parameters="^~^${parameters}~sdk_container_image=${IMAGE}~sdk_location=container${PROJECTION:+~projection=${PROJECTION}}"
}

launch_embed() {
  flex_run embed "$MACHINE_TYPE" "$MAX_WORKERS" \
    "input_subscription=projects/${PROJECT}/subscriptions/${EMBED_SUBSCRIPTION}~output_topic=projects/${PROJECT}/topics/${EMBEDDINGS_TOPIC}~dead_letter_topic=projects/${PROJECT}/topics/${DLQ_TOPIC}~bigquery_table=${PROJECT}:${DATASET}.product_embeddings~bigquery_dead_letter_table=${PROJECT}:${DATASET}.dead_letter~state_table=${PROJECT}:${DATASET}.product_state~model=${MODEL}~device=cuda~id_label=event_id~max_concurrent_downloads=${MAX_CONCURRENT_DOWNLOADS}~number_of_worker_harness_threads=${HARNESS_THREADS}~dataflow_service_options=worker_accelerator=type:${GPU_TYPE};count:1;install-nvidia-driver"
}

launch_index() {
  if [[ "$SINK" == "qdrant" ]]; then launch_index_qdrant; return; fi
  [[ "$SINK" == "faiss" ]] || { echo "deploy.sh: SINK must be faiss or qdrant, not '${SINK}'" >&2; exit 2; }
  positive NUM_SHARDS; positive INDEX_MAX_WORKERS
  # Records keyed by shard and batched by a stateful step: Dataflow acks Pub/Sub only once a batch
  # is checkpointed; each shard's writer is restored from INDEX_DIR on the worker that owns it, and
  # its commits are fenced there (docs/ARCHITECTURE.md §10, docs/DEPLOY.md §4).
  flex_run index "$INDEX_MACHINE_TYPE" "$INDEX_MAX_WORKERS" \
    "input_subscription=projects/${PROJECT}/subscriptions/${INDEX_SUBSCRIPTION}~dead_letter_topic=projects/${PROJECT}/topics/${DLQ_TOPIC}~index_dir=${INDEX_DIR}~num_shards=${NUM_SHARDS}~segment_kind=${SEGMENT_KIND}~ivf_nprobe=${IVF_NPROBE}${FILTERABLE:+~filterable=${FILTERABLE}}~commit_batching=stateful~model=${MODEL}" \
    --additional-pipeline-options="disk_size_gb=${INDEX_DISK_GB}"
}

# The index job into a Qdrant collection: no shards of ours (the engine shards and replicates), no
# stateful batching (each bundle's batches are conditional writes the engine orders), so plain
# workers; the API key stays in Secret Manager and is read by the workers (docs/DEPLOY.md §9).
launch_index_qdrant() {
  [[ "$QDRANT_URL" =~ ^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$ ]] || {
    echo "deploy.sh: SINK=qdrant needs QDRANT_URL=https://HOST[:PORT] (Qdrant Cloud, or the Helm release), not '${QDRANT_URL}'" >&2; exit 2; }
  positive QDRANT_WORKERS; positive QDRANT_SHARDS; positive QDRANT_REPLICATION
  flex_run index "n2-standard-4" "$QDRANT_WORKERS" \
    "input_subscription=projects/${PROJECT}/subscriptions/${INDEX_SUBSCRIPTION}~dead_letter_topic=projects/${PROJECT}/topics/${DLQ_TOPIC}~sink=qdrant~collection=${COLLECTION}~qdrant_url=${QDRANT_URL}~qdrant_api_key_secret=${QDRANT_API_KEY_SECRET}~qdrant_shards=${QDRANT_SHARDS}~qdrant_replication_factor=${QDRANT_REPLICATION}~segment_kind=${SEGMENT_KIND}${FILTERABLE:+~filterable=${FILTERABLE}}~model=${MODEL}"
}

# The endpoint of shard group N inside the VPC: an internal load balancer's service label makes it
# a DNS name known before the load balancer exists, so the router can be told it up front.
group_host() { echo "search-g${1}.search-g${1}.il4.${REGION}.lb.${PROJECT}.internal"; }

# One regional managed instance group of identical containers behind an internal TCP load balancer.
# Re-running it with a new IMAGE_TAG rolls the group onto the new template (one instance at a time);
# what exists already is left alone. Autohealing asks /livez (the process is up: a replica still
# restoring its shards is not broken), the load balancer /healthz (it can serve).
serve_group() {
  local name="$1" machine="$2" size="$3" disk_gb="$4" command="$5"
  ensure gcloud compute instance-templates describe "${name}-${IMAGE_TAG}" --project="$PROJECT" -- \
    gcloud compute instance-templates create-with-container "${name}-${IMAGE_TAG}" --project="$PROJECT" \
      --machine-type="$machine" --service-account="$SERVICE_ACCOUNT" --scopes=cloud-platform \
      --network="$NETWORK" --subnet="projects/${PROJECT}/regions/${REGION}/subnetworks/${SUBNET}" --region="$REGION" \
      --boot-disk-size="${disk_gb}GB" --boot-disk-type=pd-ssd --no-address \
      --container-image="$IMAGE" --container-env=EMBED_REQUIRE_GPU=0,LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      --container-command=bash --container-arg=-c --container-arg="$command"
  if [[ "${DRY_RUN:-0}" != "1" ]] && gcloud compute instance-groups managed describe "$name" --project="$PROJECT" \
      --region="$REGION" >/dev/null 2>&1; then
    run gcloud compute instance-groups managed rolling-action start-update "$name" --project="$PROJECT" \
      --region="$REGION" --version="template=${name}-${IMAGE_TAG}" --max-unavailable=0 --max-surge=3
    return
  fi
  run gcloud compute instance-groups managed create "$name" --project="$PROJECT" --region="$REGION" \
    --template="${name}-${IMAGE_TAG}" --size="$size" --health-check=search-livez --initial-delay=600
  ensure gcloud compute backend-services describe "$name" --project="$PROJECT" --region="$REGION" -- \
    gcloud compute backend-services create "$name" --project="$PROJECT" --region="$REGION" \
      --load-balancing-scheme=INTERNAL --protocol=TCP --health-checks=search-healthz
  run gcloud compute backend-services add-backend "$name" --project="$PROJECT" --region="$REGION" \
    --instance-group="$name" --instance-group-region="$REGION"
  ensure gcloud compute forwarding-rules describe "$name" --project="$PROJECT" --region="$REGION" -- \
    gcloud compute forwarding-rules create "$name" --project="$PROJECT" --region="$REGION" \
      --load-balancing-scheme=INTERNAL --backend-service="$name" --ports=8080 --network="$NETWORK" \
      --subnet="$SUBNET" --service-label="$name"
}

launch_search() {
  # Each shard group's replicas serve the index the alias `live` of INDEX_ROOT names, following it when
  # it moves (a local replica of their shards, kept current by polling); the router asks one replica of
  # every group and merges (docs/DEPLOY.md §4). Run it once the index job has made the index
  # (INDEX_DIR/index.json): the alias is set to it only if it names none yet.
  positive NUM_SHARDS; positive SHARDS_PER_REPLICA; positive SEARCH_REPLICAS; positive ROUTER_REPLICAS
  ensure "${PYTHON:-python}" -m search.aliases --root "$INDEX_ROOT" --show live -- \
    "${PYTHON:-python}" -m search.aliases --root "$INDEX_ROOT" --set "live=${INDEX_NAME}"
  # The VMs have no external address: they reach the image registry and the bucket through
  # Private Google Access on their subnet.
  run gcloud compute networks subnets update "$SUBNET" --project="$PROJECT" --region="$REGION" \
    --enable-private-ip-google-access
  for check in healthz livez; do
    ensure gcloud compute health-checks describe "search-${check}" --project="$PROJECT" --global -- \
      gcloud compute health-checks create http "search-${check}" --project="$PROJECT" --global --port=8080 \
        --request-path="/${check}" --check-interval=10s --unhealthy-threshold=3
  done
  ensure gcloud compute firewall-rules describe search-allow-internal --project="$PROJECT" -- \
    gcloud compute firewall-rules create search-allow-internal --project="$PROJECT" --network="$NETWORK" \
      --allow=tcp:8080 --source-ranges="${VPC_RANGES},35.191.0.0/16,130.211.0.0/22" \
      --description="search replicas and router: the VPC and Google's health checkers"
  local group=0 first backends=""
  for ((first = 0; first < NUM_SHARDS; first += SHARDS_PER_REPLICA, group++)); do
    local last=$((first + SHARDS_PER_REPLICA - 1 < NUM_SHARDS - 1 ? first + SHARDS_PER_REPLICA - 1 : NUM_SHARDS - 1))
    serve_group "search-g${group}" "$SEARCH_MACHINE_TYPE" "$SEARCH_REPLICAS" "$SEARCH_DISK_GB" \
      "exec python -m search.server --index_dir ${INDEX_ROOT} --alias live --shards ${first}-${last} --cache_dir /var/cache/index --host 0.0.0.0 --port 8080 --device cpu"
    backends+="${backends:+,}http://$(group_host "$group"):8080"
  done
  serve_group search-router "$ROUTER_MACHINE_TYPE" "$ROUTER_REPLICAS" "$ROUTER_DISK_GB" \
    "exec python -m search.router --backends ${backends} --host 0.0.0.0 --port 8080"
  echo "storefront endpoint: http://search-router.search-router.il4.${REGION}.lb.${PROJECT}.internal:8080/v1/search"
}

# A new model beside the serving one (docs/DEPLOY.md §5): its own embeddings topic, a subscription to
# the events topic that holds every change from now on, its index job into INDEX_ROOT/INDEX_NAME, and
# the backfill from the product state, waited for. The embed job comes next (rollout-stream), once the
# index job has applied the backfill: a patch needs its product's vector in the new index.
rollout() {
  local topic="${EMBEDDINGS_TOPIC}-${INDEX_NAME}" events_sub="${EVENTS_TOPIC}-${INDEX_NAME}"
  ensure gcloud pubsub topics describe "$topic" --project="$PROJECT" -- \
    gcloud pubsub topics create "$topic" --project="$PROJECT" --message-retention-duration=7d
  for pair in "${events_sub}:${EVENTS_TOPIC}" "${topic}-index:${topic}"; do
    ensure gcloud pubsub subscriptions describe "${pair%%:*}" --project="$PROJECT" -- \
      gcloud pubsub subscriptions create "${pair%%:*}" --project="$PROJECT" --topic="${pair#*:}" \
        --ack-deadline=600 --message-retention-duration=7d --dead-letter-topic="$DLQ_TOPIC" --max-delivery-attempts=10
  done
  grant topics "$topic" publisher
  grant subscriptions "$events_sub" subscriber
  grant subscriptions "${topic}-index" subscriber
  INDEX_SUBSCRIPTION="${topic}-index" launch_index
  run "${PYTHON:-python}" -m pipelines.reembed --runner DataflowRunner --project="$PROJECT" --region="$REGION" \
    --temp_location="gs://${BUCKET}/tmp" --staging_location="gs://${BUCKET}/staging" \
    --job_name="reembed-${INDEX_NAME}-${JOB_SUFFIX}" --service_account_email="$SERVICE_ACCOUNT" \
    --sdk_container_image="$IMAGE" --sdk_location=container --experiments=use_runner_v2 \
    --machine_type="$MACHINE_TYPE" --max_num_workers="$MAX_WORKERS" --device=cuda \
    --dataflow_service_options="worker_accelerator=type:${GPU_TYPE};count:1;install-nvidia-driver" \
    --source="bigquery:${PROJECT}:${DATASET}.product_state" --model="$MODEL" ${PROJECTION:+--projection="$PROJECTION"} \
    --output_topic="projects/${PROJECT}/topics/${topic}" --bigquery_dead_letter_table="${PROJECT}:${DATASET}.dead_letter" \
    --wait
  echo "next, once the index job has applied the backfill (the subscription ${topic}-index has no backlog):"
  echo "  INDEX_NAME=${INDEX_NAME} MODEL=${MODEL}${PROJECTION:+ PROJECTION=${PROJECTION}} deploy/deploy.sh rollout-stream"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then  # the whole sequence, printed
    rollout_stream
    SERVING_NAME="${SERVING_NAME:-v1}" rollout_switch
  fi
}

rollout_stream() {
  EMBED_SUBSCRIPTION="${EVENTS_TOPIC}-${INDEX_NAME}" EMBEDDINGS_TOPIC="${EMBEDDINGS_TOPIC}-${INDEX_NAME}" launch_embed
  echo "next: INDEX_NAME=${INDEX_NAME} SERVING_NAME=... OLD_JOBS=... deploy/deploy.sh rollout-switch"
}

# The gate against the serving index; on a pass, the alias switch (search replicas follow it within
# seconds) and the old model's jobs drained. A refusal stops here, the alias unmoved.
rollout_switch() {
  : "${SERVING_NAME:?set SERVING_NAME (python -m search.aliases --root ${INDEX_ROOT} --show live)}"
  run "${PYTHON:-python}" -m evaluation.gate --root "$INDEX_ROOT" --candidate "$INDEX_NAME" \
    ${QRELS:+--qrels "$QRELS"} ${PHOTOS:+--photos "$PHOTOS"} --output "gate-${INDEX_NAME}.json"
  run "${PYTHON:-python}" -m search.aliases --root "$INDEX_ROOT" --set "live=${INDEX_NAME}" --expect "$SERVING_NAME"
  local job
  for job in ${OLD_JOBS//,/ }; do
    run gcloud dataflow jobs drain "$job" --project="$PROJECT" --region="$REGION"
  done
}

case "${1:-}" in
  infra) infra ;;
  build-image) build_image ;;
  build-templates) build_templates ;;
  stage-model) stage_model ;;
  launch-embed) launch_embed ;;
  launch-index) launch_index ;;
  launch-search) launch_search ;;
  rollout) rollout ;;
  rollout-stream) rollout_stream ;;
  rollout-switch) rollout_switch ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
