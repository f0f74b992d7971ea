// reconstruct.cpp — examples/c/reconstruct.c in C++ with klvae.hpp: read an
// image of any size, pad it to a multiple of the downsampling factor, encode,
// decode the mean (or a seeded draw), crop back, write the PNG, print the PSNR.
//
//   g++ -std=c++17 -I examples/cpp reconstruct.cpp $(pkg-config --cflags --libs klvae) -o reconstruct
//   ./reconstruct MODEL in.png out.png [--sample SEED]
//
// Errors arrive as klvae::Error exceptions: what() is the library's message,
// status() the klvae_status_t. No handle leaks on any path: the objects free
// what they own when the exception leaves their scope.
#include "klvae.hpp"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

// (3, h, w) -> (3, ph, pw), repeating the last row and column (as klvae does).
std::vector<float> pad(const klvae::Image &img, int ph, int pw)
{
    const int h = img.height, w = img.width;
    std::vector<float> out(static_cast<std::size_t>(3) * ph * pw);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < ph; y++) {
            const float *src = &img.pixels[(static_cast<std::size_t>(c) * h + (y < h ? y : h - 1)) * w];
            float *dst = &out[(static_cast<std::size_t>(c) * ph + y) * pw];
            for (int x = 0; x < pw; x++)
                dst[x] = src[x < w ? x : w - 1];
        }
    return out;
}

// The top-left (3, h, w) corner of a (3, ph, pw) image.
std::vector<float> crop(const std::vector<float> &img, int ph, int pw, int h, int w)
{
    std::vector<float> out(static_cast<std::size_t>(3) * h * w);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                out[(static_cast<std::size_t>(c) * h + y) * w + x] =
                    img[(static_cast<std::size_t>(c) * ph + y) * pw + x];
    return out;
}

int run(int argc, char **argv)
{
    bool sample = false;
    std::uint64_t seed = 0;
    if (argc == 6 && std::strcmp(argv[4], "--sample") == 0) {
        char *end = nullptr;
        errno = 0;
        seed = std::strtoull(argv[5], &end, 10);
        if (errno != 0 || end == argv[5] || *end != '\0' || argv[5][0] == '-') {
            std::fprintf(stderr, "--sample: '%s' is not a seed (0 to 2^64 - 1)\n", argv[5]);
            return 2;
        }
        sample = true;
    } else if (argc != 4) {
        std::fprintf(stderr, "usage: %s MODEL in.png out.png [--sample SEED]\n", argv[0]);
        return 2;
    }
    if (!klvae::runtime_compatible()) {
        std::fprintf(stderr, "libklvae %s cannot serve a program built for %s\n",
                     klvae::version_string().c_str(), KLVAE_VERSION_STRING);
        return 1;
    }

    klvae::Model model = klvae::Model::load(argv[1]);
    if (model.in_channels() != 3 || model.out_channels() != 3) {
        std::fprintf(stderr, "%s: the model does not map RGB images to RGB images\n", argv[1]);
        return 1;
    }
    const klvae::Image img = klvae::read_image(argv[2]);
    const int f = model.downsampling_factor();
    const int ph = (img.height + f - 1) / f * f, pw = (img.width + f - 1) / f * f;

    // encode -> (mean, logvar), each (1, latent_channels, ph / f, pw / f)
    const klvae::Posterior post = model.encode(pad(img, ph, pw), 1, ph, pw);
    const std::vector<float> z = sample ? model.sample(post, seed) : post.mean;
    const std::vector<float> decoded = model.decode(z, 1, post.shape.h, post.shape.w);
    const std::vector<float> out = crop(decoded, ph, pw, img.height, img.width);
    klvae::write_png(argv[3], out, img.height, img.width);

    double se = 0;
    for (std::size_t i = 0; i < out.size(); i++) {
        const double d = 0.5 * (static_cast<double>(out[i]) - img.pixels[i]);
        se += d * d;
    }
    const double mse = se / static_cast<double>(out.size());
    std::printf("%s: %d x %d -> latent %d x %d x %d (%s) -> %s, PSNR %.2f dB\n", argv[2],
                img.width, img.height, post.shape.c, post.shape.h, post.shape.w,
                sample ? ("sample seed " + std::to_string(seed)).c_str() : "mean", argv[3],
                mse > 0 ? 10.0 * std::log10(1.0 / mse) : INFINITY);
    return 0;
}

} // namespace

int main(int argc, char **argv)
{
    try {
        return run(argc, argv);
    } catch (const klvae::Error &e) {
        std::fprintf(stderr, "%s\n", e.what()); // "klvae_model_load: cannot open ... (input/output error)"
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
