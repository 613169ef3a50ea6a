-- Runtime configuration: policy that operators change without a deploy. Every
-- replica polls last_modified and picks a change up within seconds.
CREATE TABLE configuration (
    key           text        PRIMARY KEY,
    value         jsonb       NOT NULL,
    last_modified timestamptz NOT NULL DEFAULT now()
);
