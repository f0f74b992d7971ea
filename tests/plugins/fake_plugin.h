/* fake_plugin.h — what the fake CUDA plugin (fake_plugin.c) records of the
 * core's calls, exported as fake_plugin_record for tests/test_plugin.c. */
#ifndef KV_FAKE_PLUGIN_H
#define KV_FAKE_PLUGIN_H

typedef struct fake_record {
    int probes, creates, destroys, set_streams, synchronizes, uploads, downloads;
    int imports, exports; /* import_device, export_device */
    int live_allocations; /* alloc minus release */
    int probe_device, create_device, create_precision;
    void *last_stream;
    void *streams[8]; /* the first set_stream arguments, in order */
    /* the data-parallel functions (working mode): comm_create got the id
     * rank 0 broadcast (bootstrap_ok), each comm_allreduce is one bucket
     * (its tensor count and the total floats, in order), comm_wait calls */
    int comm_creates, comm_destroys, comm_waits, bootstrap_ok;
    int buckets, bucket_tensors[16];
    long bucket_floats[16];
    int buckets_at_wait[4]; /* buckets queued when each of the first waits came */
} fake_record;

#define FAKE_RECORD_SYMBOL "fake_plugin_record"

#endif
