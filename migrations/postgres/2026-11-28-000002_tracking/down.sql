DROP INDEX account_audit_actor_ts_idx;
DROP INDEX request_logs_failed_idx;
DROP TABLE usage_daily_users;
DROP TABLE usage_daily;
