/* test_safetensors.c — placeholder, filled in by the next commits. */
#include "test_util.h"

Suite *suite_safetensors(void)
{
    Suite *s = suite_create("safetensors");
    return s;
}
