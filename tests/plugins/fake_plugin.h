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
} fake_record;

#define FAKE_RECORD_SYMBOL "fake_plugin_record"

#endif
