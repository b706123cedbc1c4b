//! The Kafka side (src/kafka): the producer's watchdog and the topic's partition map.

mod partition_map;
mod producer_watchdog;
