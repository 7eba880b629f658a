-- One PostgreSQL for the three stores: MLflow's tracking + registry, Prefect's orchestration state, and charforge's
-- serving store (the route table every gateway watches, rollout locks and records: platform.serving_store).
-- Runs once, when the data volume is empty. The owner (POSTGRES_USER) may create pg_trgm, which Prefect uses.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE charforge;
