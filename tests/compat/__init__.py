"""Compatibility tests with ZooKeeper clients nobody here wrote (Curator, zkCli.sh,
node-zookeeper-client, kazoo's recipes), each run against zkgate and real ZooKeeper."""
