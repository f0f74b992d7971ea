// klvae.hpp — a header-only C++17 wrapper of libklvae's C API (include/klvae.h).
//
//   #include "klvae.hpp"      // g++ -std=c++17 app.cpp $(pkg-config --cflags --libs klvae)
//
//   klvae::Model model = klvae::Model::load("sd-vae-ft-mse");
//   klvae::Image img = klvae::read_image("photo.png");            // (3, h, w) in [-1, 1]
//   klvae::Posterior post = model.encode(img.pixels, 1, img.height, img.width);
//   std::vector<float> out = model.decode(post.mean, 1, post.shape.h, post.shape.w);
//   klvae::write_png("out.png", out, img.height, img.width);
//
// What it adds to the C API, and nothing more:
//   - errors are exceptions: every failing call throws klvae::Error, a
//     std::runtime_error whose what() is klvae_last_error()'s message (with the
//     call's name and the status in words) and whose status() is the
//     klvae_status_t;
//   - handles are owned: Options, Model and Trainer free what they hold in
//     their destructors; they are move-only (unique ownership), and a
//     moved-from object is empty (calls on it throw KLVAE_ERR_INVALID_ARGUMENT);
//   - arrays are checked: encode, sample, decode, step and write_png take
//     klvae::Span (a pointer and an element count, made implicitly from a
//     std::vector, std::array or any contiguous container) and compare the
//     count with the shape the call implies, throwing KLVAE_ERR_SHAPE on a
//     mismatch, before the library reads or writes a byte; overloads that
//     return std::vector allocate the right size for you.
//
// The threading rules are the C API's: one object must not be used by two
// threads at once; different objects may. A Trainer borrows its Model: the
// Model must outlive the Trainer and must not be moved while the Trainer
// exists (Trainer::model() refers to that Model object).
//
// This header is an example shipped with the sources (examples/cpp/); copy it
// into your project. It needs only <klvae.h> and the standard library.
#ifndef KLVAE_HPP
#define KLVAE_HPP

#include <klvae.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace klvae {

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

// What every failing call throws.
class Error : public std::runtime_error {
public:
    Error(klvae_status_t status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    // The C status: KLVAE_ERR_IO, KLVAE_ERR_SHAPE, ...
    klvae_status_t status() const noexcept { return status_; }
    // The status in words ("invalid argument").
    const char *status_string() const noexcept { return klvae_status_string(status_); }

private:
    klvae_status_t status_;
};

namespace detail {

// Throws for a failed status. Reads klvae_last_error() at once: the next
// libklvae call that returns a status would replace it.
inline void check(klvae_status_t status, const char *call)
{
    if (status == KLVAE_OK)
        return;
    std::string message = std::string(call) + ": " + klvae_last_error() + " (" +
                          klvae_status_string(status) + ")";
    throw Error(status, message);
}

[[noreturn]] inline void fail(klvae_status_t status, const std::string &message)
{
    throw Error(status, message + " (" + klvae_status_string(status) + ")");
}

// a * b * c * d for non-negative ints, throwing instead of overflowing.
inline std::size_t product(const char *call, int a, int b, int c, int d)
{
    const int dims[4] = {a, b, c, d};
    std::size_t n = 1;
    for (int x : dims) {
        if (x <= 0)
            fail(KLVAE_ERR_INVALID_ARGUMENT, std::string(call) + ": sizes must be positive, got " +
                                                 std::to_string(x));
        if (n > static_cast<std::size_t>(-1) / static_cast<std::size_t>(x))
            fail(KLVAE_ERR_INVALID_ARGUMENT, std::string(call) + ": sizes overflow");
        n *= static_cast<std::size_t>(x);
    }
    return n;
}

// Calls get(buf, size) with a buffer of the size the value needs: 256 bytes
// first, then what klvae_last_needed_size() reports when that was too small.
template <class Get>
std::string get_string(const char *call, Get get)
{
    std::size_t size = 256;
    for (;;) {
        std::vector<char> buf(size);
        klvae_status_t st = get(buf.data(), buf.size());
        if (st == KLVAE_OK)
            return std::string(buf.data());
        if (st != KLVAE_ERR_BUFFER_TOO_SMALL || klvae_last_needed_size() <= size)
            check(st, call);
        size = klvae_last_needed_size();
    }
}

// Option values as text, parsed strictly by the library ("1e-4", "true").
inline std::string to_text(const std::string &v) { return v; }
inline std::string to_text(const char *v) { return v; }
inline std::string to_text(bool v) { return v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string to_text(T v)
{
    return std::to_string(v);
}
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
std::string to_text(T v)
{
    char buf[40]; // %.17g round-trips a double exactly
    std::snprintf(buf, sizeof buf, "%.17g", static_cast<double>(v));
    return buf;
}

} // namespace detail

// ---------------------------------------------------------------------------
// Version
// ---------------------------------------------------------------------------

// The loaded library's version, MAJOR*10000 + MINOR*100 + PATCH, and as text.
inline unsigned version() noexcept { return klvae_version(); }
inline std::string version_string() { return klvae_version_string(); }

// True when the loaded library can serve code compiled against this header:
// same major version, and a minor version at least the header's.
inline bool runtime_compatible() noexcept
{
    const unsigned v = klvae_version();
    return v / 10000 == KLVAE_VERSION_MAJOR && v / 100 % 100 >= KLVAE_VERSION_MINOR;
}

// ---------------------------------------------------------------------------
// Span: a pointer and an element count
// ---------------------------------------------------------------------------

// A non-owning view of contiguous elements, the part of C++20's std::span
// this wrapper needs. Made from (pointer, count) or, implicitly, from any
// container with data() and size() (std::vector, std::array, ...). The
// container must outlive the call it is passed to, nothing more.
template <class T>
class Span {
public:
    constexpr Span() noexcept = default;
    constexpr Span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <class C,
              class = std::enable_if_t<
                  !std::is_same_v<std::decay_t<C>, Span> &&
                  std::is_convertible_v<decltype(std::declval<C &>().data()), T *>>>
    constexpr Span(C &&container) noexcept(noexcept(container.data()))
        : data_(container.data()), size_(static_cast<std::size_t>(container.size()))
    {
    }
    constexpr T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }

private:
    T *data_ = nullptr;
    std::size_t size_ = 0;
};

// ---------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------

// An NCHW shape: batch, channels, rows, columns.
struct Shape {
    int n = 0, c = 0, h = 0, w = 0;
    std::size_t size() const { return detail::product("Shape::size", n, c, h, w); }
};

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

// Key/value settings (docs/options.md), owned. Values may be given as text or
// as numbers and bools, which are turned into the text the library parses.
//   klvae::Options o;
//   o.set("config", "tiny").set("threads", 2).set("learning_rate", 1e-4);
class Options {
public:
    Options()
    {
        klvae_options_t *o = nullptr;
        detail::check(klvae_options_create(&o), "klvae_options_create");
        handle_.reset(o);
    }

    // Sets key to value; an unknown key or a bad value throws
    // KLVAE_ERR_OPTION naming both, and leaves the object unchanged.
    template <class V>
    Options &set(const std::string &key, const V &value)
    {
        const std::string text = detail::to_text(value);
        detail::check(klvae_options_set(native(), key.c_str(), text.c_str()), "klvae_options_set");
        return *this;
    }

    // The value of key: the one set, else its default.
    std::string get(const std::string &key) const
    {
        const klvae_options_t *o = native();
        return detail::get_string("klvae_options_get", [&](char *buf, std::size_t size) {
            return klvae_options_get(o, key.c_str(), buf, size);
        });
    }

    // The handle, for C calls this wrapper does not cover.
    klvae_options_t *native() const
    {
        if (!handle_)
            detail::fail(KLVAE_ERR_INVALID_ARGUMENT, "klvae::Options: used after a move");
        return handle_.get();
    }

private:
    struct Free {
        void operator()(klvae_options_t *o) const noexcept { klvae_options_free(o); }
    };
    std::unique_ptr<klvae_options_t, Free> handle_;
};

// One option the library accepts: its key, default ("" if none) and help.
struct OptionInfo {
    std::string key, default_value, help;
};

// Every option key, in the library's order.
inline std::vector<OptionInfo> option_list()
{
    std::vector<OptionInfo> out;
    const char *key = nullptr, *def = nullptr, *help = nullptr;
    for (int i = 0; klvae_option_describe(i, &key, &def, &help) == KLVAE_OK; i++)
        out.push_back({key, def, help});
    return out;
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

// An encoder's output: the diagonal Gaussian posterior, mean and logvar of
// shape (n, latent_channels, h / f, w / f).
struct Posterior {
    Shape shape;
    std::vector<float> mean, logvar;
};

// A loaded or created autoencoder, owned (move-only).
class Model {
public:
    // Loads a diffusers folder or a .safetensors file (klvae_model_load).
    static Model load(const std::string &path) { return load_impl(path, nullptr); }
    static Model load(const std::string &path, const Options &opts)
    {
        return load_impl(path, opts.native());
    }

    // A freshly initialised model from the options' config keys
    // (klvae_model_create): Options().set("config", "tiny"), ...
    static Model create(const Options &opts)
    {
        klvae_model_t *m = nullptr;
        detail::check(klvae_model_create(opts.native(), &m), "klvae_model_create");
        return Model(m);
    }

    // An empty Model (to assign to later).
    Model() noexcept = default;
    // Adopts a handle from the C API (nullptr gives an empty Model).
    explicit Model(klvae_model_t *adopt) noexcept : handle_(adopt) {}

    // Writes a diffusers folder (klvae_model_save).
    void save(const std::string &path) const
    {
        detail::check(klvae_model_save(native(), path.c_str()), "klvae_model_save");
    }

    int in_channels() const { return klvae_model_in_channels(native()); }
    int out_channels() const { return klvae_model_out_channels(native()); }
    int latent_channels() const { return klvae_model_latent_channels(native()); }
    int downsampling_factor() const { return klvae_model_downsampling_factor(native()); }
    float scaling_factor() const { return klvae_model_scaling_factor(native()); }
    float shift_factor() const { return klvae_model_shift_factor(native()); }
    std::int64_t parameter_count() const { return klvae_model_parameter_count(native()); }
    std::string backend() const { return klvae_model_backend(native()); }

    // A config or runtime value as option text (klvae_model_get):
    // get("block_out_channels") == "128,256,512,512".
    std::string get(const std::string &key) const
    {
        const klvae_model_t *m = native();
        return detail::get_string("klvae_model_get", [&](char *buf, std::size_t size) {
            return klvae_model_get(m, key.c_str(), buf, size);
        });
    }

    // Shapes of the tensors at the boundary. latent_shape throws
    // KLVAE_ERR_INVALID_ARGUMENT unless h and w are positive multiples of f.
    Shape image_shape(int n, int h, int w) const { return {n, in_channels(), h, w}; }
    Shape decoded_shape(int n, int lat_h, int lat_w) const
    {
        const int f = downsampling_factor();
        return {n, out_channels(), lat_h * f, lat_w * f};
    }
    Shape latent_shape(int n, int h, int w) const
    {
        const int f = downsampling_factor();
        if (n <= 0 || h <= 0 || w <= 0 || h % f != 0 || w % f != 0)
            detail::fail(KLVAE_ERR_INVALID_ARGUMENT,
                         "klvae::Model: image size " + std::to_string(h) + " x " +
                             std::to_string(w) + " (batch " + std::to_string(n) +
                             ") is not a positive multiple of the downsampling factor " +
                             std::to_string(f));
        return {n, latent_channels(), h / f, w / f};
    }

    // Encodes n images (n, in_channels, h, w) into mean and, unless logvar is
    // empty, logvar, each (n, latent_channels, h / f, w / f).
    void encode(Span<const float> images, int n, int h, int w, Span<float> mean,
                Span<float> logvar = {})
    {
        const Shape lat = latent_shape(n, h, w);
        expect("klvae_encode", "images", images.size(), image_shape(n, h, w));
        expect("klvae_encode", "mean", mean.size(), lat);
        if (!logvar.empty())
            expect("klvae_encode", "logvar", logvar.size(), lat);
        detail::check(klvae_encode(native(), images.data(), n, h, w, mean.data(),
                                   logvar.empty() ? nullptr : logvar.data()),
                      "klvae_encode");
    }
    Posterior encode(Span<const float> images, int n, int h, int w)
    {
        Posterior p;
        p.shape = latent_shape(n, h, w);
        p.mean.resize(p.shape.size());
        p.logvar.resize(p.shape.size());
        encode(images, n, h, w, p.mean, p.logvar);
        return p;
    }

    // Draws z = mean + exp(logvar / 2) * eps with a seeded counter-based
    // generator (the same z on every machine). z may be mean or logvar.
    void sample(Span<const float> mean, Span<const float> logvar, int n, int lat_h, int lat_w,
                std::uint64_t seed, Span<float> z)
    {
        const Shape lat{n, latent_channels(), lat_h, lat_w};
        expect("klvae_sample", "mean", mean.size(), lat);
        expect("klvae_sample", "logvar", logvar.size(), lat);
        expect("klvae_sample", "z", z.size(), lat);
        detail::check(klvae_sample(native(), mean.data(), logvar.data(), n, lat_h, lat_w, seed,
                                   z.data()),
                      "klvae_sample");
    }
    std::vector<float> sample(const Posterior &p, std::uint64_t seed)
    {
        std::vector<float> z(p.mean.size());
        sample(p.mean, p.logvar, p.shape.n, p.shape.h, p.shape.w, seed, z);
        return z;
    }

    // Decodes n latents (n, latent_channels, lat_h, lat_w) into images
    // (n, out_channels, lat_h * f, lat_w * f), not clamped.
    void decode(Span<const float> z, int n, int lat_h, int lat_w, Span<float> images)
    {
        expect("klvae_decode", "z", z.size(), Shape{n, latent_channels(), lat_h, lat_w});
        expect("klvae_decode", "images", images.size(), decoded_shape(n, lat_h, lat_w));
        detail::check(klvae_decode(native(), z.data(), n, lat_h, lat_w, images.data()),
                      "klvae_decode");
    }
    std::vector<float> decode(Span<const float> z, int n, int lat_h, int lat_w)
    {
        std::vector<float> images(decoded_shape(n, lat_h, lat_w).size());
        decode(z, n, lat_h, lat_w, images);
        return images;
    }

    // The handle, for C calls this wrapper does not cover. Still owned here.
    klvae_model_t *native() const
    {
        if (!handle_)
            detail::fail(KLVAE_ERR_INVALID_ARGUMENT, "klvae::Model: empty (moved from)");
        return handle_.get();
    }
    // Gives up ownership: the caller frees the handle with klvae_model_free.
    klvae_model_t *release() noexcept { return handle_.release(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    static Model load_impl(const std::string &path, const klvae_options_t *opts)
    {
        klvae_model_t *m = nullptr;
        detail::check(klvae_model_load(path.c_str(), opts, &m), "klvae_model_load");
        return Model(m);
    }
    static void expect(const char *call, const char *what, std::size_t got, const Shape &s)
    {
        const std::size_t want = s.size();
        if (got != want)
            detail::fail(KLVAE_ERR_SHAPE,
                         std::string(call) + ": " + what + " has " + std::to_string(got) +
                             " elements, the shape (" + std::to_string(s.n) + ", " +
                             std::to_string(s.c) + ", " + std::to_string(s.h) + ", " +
                             std::to_string(s.w) + ") needs " + std::to_string(want));
    }
    friend class Trainer;

    struct Free {
        void operator()(klvae_model_t *m) const noexcept { klvae_model_free(m); }
    };
    std::unique_ptr<klvae_model_t, Free> handle_;
};

// ---------------------------------------------------------------------------
// Trainer
// ---------------------------------------------------------------------------

using StepStats = klvae_step_stats_t;

// Trains a Model it borrows (klvae_trainer_create): the Model must outlive
// the Trainer and stay where it is (not moved) meanwhile. Owned, move-only.
class Trainer {
public:
    explicit Trainer(Model &model) : Trainer(model, nullptr) {}
    Trainer(Model &model, const Options &opts) : Trainer(model, opts.native()) {}
    // A temporary Model would die before the Trainer: refused at compile time.
    explicit Trainer(Model &&) = delete;
    Trainer(Model &&, const Options &) = delete;

    // One optimizer step on n images (n, in_channels, h, w) in [-1, 1].
    StepStats step(Span<const float> images, int n, int h, int w)
    {
        Model::expect("klvae_trainer_step", "images", images.size(),
                      model_->image_shape(n, h, w));
        StepStats stats = KLVAE_STEP_STATS_INIT;
        detail::check(klvae_trainer_step(native(), images.data(), n, h, w, &stats),
                      "klvae_trainer_step");
        return stats;
    }

    // Checkpoints: everything needed to continue exactly.
    void save(const std::string &path) const
    {
        detail::check(klvae_trainer_save(native(), path.c_str()), "klvae_trainer_save");
    }
    void load(const std::string &path)
    {
        detail::check(klvae_trainer_load(native(), path.c_str()), "klvae_trainer_load");
    }
    // Writes the trained autoencoder as a diffusers folder; use_ema picks the
    // EMA weights (needs ema_decay > 0).
    void export_diffusers(const std::string &path, bool use_ema = false) const
    {
        detail::check(klvae_trainer_export(native(), path.c_str(), use_ema ? 1 : 0),
                      "klvae_trainer_export");
    }

    std::int64_t step_count() const { return klvae_trainer_step_count(native()); }
    std::string get(const std::string &key) const
    {
        const klvae_trainer_t *t = native();
        return detail::get_string("klvae_trainer_get", [&](char *buf, std::size_t size) {
            return klvae_trainer_get(t, key.c_str(), buf, size);
        });
    }
    // Notes saved in checkpoints (keys and values up to 255 bytes).
    void set_note(const std::string &key, const std::string &value)
    {
        detail::check(klvae_trainer_set_note(native(), key.c_str(), value.c_str()),
                      "klvae_trainer_set_note");
    }
    std::string note(const std::string &key) const
    {
        const klvae_trainer_t *t = native();
        return detail::get_string("klvae_trainer_get_note", [&](char *buf, std::size_t size) {
            return klvae_trainer_get_note(t, key.c_str(), buf, size);
        });
    }

    // The Model being trained.
    Model &model() const noexcept { return *model_; }
    klvae_trainer_t *native() const
    {
        if (!handle_)
            detail::fail(KLVAE_ERR_INVALID_ARGUMENT, "klvae::Trainer: empty (moved from)");
        return handle_.get();
    }

private:
    Trainer(Model &model, const klvae_options_t *opts) : model_(&model)
    {
        klvae_trainer_t *t = nullptr;
        detail::check(klvae_trainer_create(model.native(), opts, &t), "klvae_trainer_create");
        handle_.reset(t);
    }
    struct Free {
        void operator()(klvae_trainer_t *t) const noexcept { klvae_trainer_free(t); }
    };
    Model *model_;
    std::unique_ptr<klvae_trainer_t, Free> handle_;
};

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

// An RGB image, (3, height, width) floats in [-1, 1].
struct Image {
    int height = 0, width = 0;
    std::vector<float> pixels;
};

// Reads a PNG or JPEG (klvae_image_read).
inline Image read_image(const std::string &path)
{
    float *p = nullptr;
    int h = 0, w = 0;
    detail::check(klvae_image_read(path.c_str(), &p, &h, &w), "klvae_image_read");
    struct Free {
        void operator()(float *q) const noexcept { klvae_free(q); }
    };
    std::unique_ptr<float, Free> owned(p); // freed even if the copy throws
    Image img;
    img.height = h;
    img.width = w;
    img.pixels.assign(p, p + detail::product("klvae_image_read", 3, h, w, 1));
    return img;
}

// Writes (3, h, w) floats in [-1, 1] as an 8-bit RGB PNG (klvae_image_write_png).
inline void write_png(const std::string &path, Span<const float> pixels, int h, int w)
{
    const std::size_t want = detail::product("klvae_image_write_png", 3, h, w, 1);
    if (pixels.size() != want)
        detail::fail(KLVAE_ERR_SHAPE, "klvae_image_write_png: pixels has " +
                                          std::to_string(pixels.size()) + " elements, a " +
                                          std::to_string(h) + " x " + std::to_string(w) +
                                          " RGB image needs " + std::to_string(want));
    detail::check(klvae_image_write_png(path.c_str(), pixels.data(), h, w),
                  "klvae_image_write_png");
}
inline void write_png(const std::string &path, const Image &img)
{
    write_png(path, img.pixels, img.height, img.width);
}

} // namespace klvae

#endif // KLVAE_HPP
