"""The embedded default corpus: procedural images with multilingual captions.

Each image shows 1-3 copies of a coloured shape in one region, on a light or dark textured
background. Its caption says the count, colour, shape and position in one of nine languages
(en de fr es zh ja ru ar hi; eleven more for the language-ID benchmark) with several paraphrases, so a model must learn the mapping from
pixels to words in every script rather than memorise strings. Generation is seeded and fast.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("light", "dark")

# Per language: noun phrases for counts 1..3 with a {c} slot for the colour (so agreement and
# word order are each language's own), colour phrases, positions, backgrounds, caption templates.
LANGS: Dict[str, dict] = {
    "en": dict(
        nouns={"circle": ["a {c} circle", "two {c} circles", "three {c} circles"],
               "square": ["a {c} square", "two {c} squares", "three {c} squares"],
               "triangle": ["a {c} triangle", "two {c} triangles", "three {c} triangles"],
               "star": ["a {c} star", "two {c} stars", "three {c} stars"]},
        colors={"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple", "orange": "orange"},
        positions={"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "center": "in the center"},
        backgrounds={"light": "on a light background", "dark": "on a dark background"},
        templates=["{n} {p}", "{n} {p} {bg}", "a picture of {n} {p}"],
    ),
    "de": dict(
        nouns={"circle": ["ein Kreis in {c}", "zwei Kreise in {c}", "drei Kreise in {c}"],
               "square": ["ein Quadrat in {c}", "zwei Quadrate in {c}", "drei Quadrate in {c}"],
               "triangle": ["ein Dreieck in {c}", "zwei Dreiecke in {c}", "drei Dreiecke in {c}"],
               "star": ["ein Stern in {c}", "zwei Sterne in {c}", "drei Sterne in {c}"]},
        colors={"red": "Rot", "green": "Grün", "blue": "Blau", "yellow": "Gelb", "purple": "Lila", "orange": "Orange"},
        positions={"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "center": "in der Mitte"},
        backgrounds={"light": "auf hellem Hintergrund", "dark": "auf dunklem Hintergrund"},
        templates=["{n} {p}", "{n}, {p}, {bg}", "{p}: {n}"],
    ),
    "fr": dict(
        nouns={"circle": ["un cercle {c}", "deux cercles {c}", "trois cercles {c}"],
               "square": ["un carré {c}", "deux carrés {c}", "trois carrés {c}"],
               "triangle": ["un triangle {c}", "deux triangles {c}", "trois triangles {c}"],
               "star": ["une étoile {c}", "deux étoiles {c}", "trois étoiles {c}"]},
        colors={"red": "de couleur rouge", "green": "de couleur verte", "blue": "de couleur bleue",
                "yellow": "de couleur jaune", "purple": "de couleur violette", "orange": "de couleur orange"},
        positions={"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre"},
        backgrounds={"light": "sur fond clair", "dark": "sur fond sombre"},
        templates=["{n} {p}", "{n} {p}, {bg}", "une image avec {n} {p}"],
    ),
    "es": dict(
        nouns={"circle": ["un círculo {c}", "dos círculos {c}", "tres círculos {c}"],
               "square": ["un cuadrado {c}", "dos cuadrados {c}", "tres cuadrados {c}"],
               "triangle": ["un triángulo {c}", "dos triángulos {c}", "tres triángulos {c}"],
               "star": ["una estrella {c}", "dos estrellas {c}", "tres estrellas {c}"]},
        colors={"red": "de color rojo", "green": "de color verde", "blue": "de color azul",
                "yellow": "de color amarillo", "purple": "de color morado", "orange": "de color naranja"},
        positions={"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo", "center": "en el centro"},
        backgrounds={"light": "sobre fondo claro", "dark": "sobre fondo oscuro"},
        templates=["{n} {p}", "{n} {p}, {bg}", "una imagen con {n} {p}"],
    ),
    "zh": dict(
        nouns={"circle": ["一个{c}圆形", "两个{c}圆形", "三个{c}圆形"],
               "square": ["一个{c}正方形", "两个{c}正方形", "三个{c}正方形"],
               "triangle": ["一个{c}三角形", "两个{c}三角形", "三个{c}三角形"],
               "star": ["一个{c}星形", "两个{c}星形", "三个{c}星形"]},
        colors={"red": "红色的", "green": "绿色的", "blue": "蓝色的", "yellow": "黄色的", "purple": "紫色的", "orange": "橙色的"},
        positions={"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "center": "中间"},
        backgrounds={"light": "浅色背景上", "dark": "深色背景上"},
        templates=["{p}有{n}", "{bg}，{p}有{n}", "图片{p}是{n}"],
    ),
    "ja": dict(
        nouns={"circle": ["{c}円が1つ", "{c}円が2つ", "{c}円が3つ"],
               "square": ["{c}四角形が1つ", "{c}四角形が2つ", "{c}四角形が3つ"],
               "triangle": ["{c}三角形が1つ", "{c}三角形が2つ", "{c}三角形が3つ"],
               "star": ["{c}星が1つ", "{c}星が2つ", "{c}星が3つ"]},
        colors={"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の", "orange": "オレンジ色の"},
        positions={"left": "左", "right": "右", "top": "上", "bottom": "下", "center": "中央"},
        backgrounds={"light": "明るい背景", "dark": "暗い背景"},
        templates=["{p}に{n}", "{bg}で、{p}に{n}", "画像の{p}に{n}"],
    ),
    "ru": dict(
        nouns={"circle": ["один круг {c}", "два круга {c}", "три круга {c}"],
               "square": ["один квадрат {c}", "два квадрата {c}", "три квадрата {c}"],
               "triangle": ["один треугольник {c}", "два треугольника {c}", "три треугольника {c}"],
               "star": ["одна звезда {c}", "две звезды {c}", "три звезды {c}"]},
        colors={"red": "красного цвета", "green": "зелёного цвета", "blue": "синего цвета",
                "yellow": "жёлтого цвета", "purple": "фиолетового цвета", "orange": "оранжевого цвета"},
        positions={"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу", "center": "в центре"},
        backgrounds={"light": "на светлом фоне", "dark": "на тёмном фоне"},
        templates=["{n} {p}", "{n} {p} {bg}", "изображение: {n} {p}"],
    ),
    "ar": dict(
        nouns={"circle": ["دائرة {c}", "دائرتان {c}", "ثلاث دوائر {c}"],
               "square": ["مربع {c}", "مربعان {c}", "ثلاثة مربعات {c}"],
               "triangle": ["مثلث {c}", "مثلثان {c}", "ثلاثة مثلثات {c}"],
               "star": ["نجمة {c}", "نجمتان {c}", "ثلاث نجوم {c}"]},
        colors={"red": "باللون الأحمر", "green": "باللون الأخضر", "blue": "باللون الأزرق",
                "yellow": "باللون الأصفر", "purple": "باللون البنفسجي", "orange": "باللون البرتقالي"},
        positions={"left": "على اليسار", "right": "على اليمين", "top": "في الأعلى", "bottom": "في الأسفل", "center": "في المنتصف"},
        backgrounds={"light": "على خلفية فاتحة", "dark": "على خلفية داكنة"},
        templates=["{n} {p}", "{n} {p} {bg}", "صورة فيها {n} {p}"],
    ),
    "hi": dict(
        nouns={"circle": ["{c} रंग का एक वृत्त", "{c} रंग के दो वृत्त", "{c} रंग के तीन वृत्त"],
               "square": ["{c} रंग का एक वर्ग", "{c} रंग के दो वर्ग", "{c} रंग के तीन वर्ग"],
               "triangle": ["{c} रंग का एक त्रिभुज", "{c} रंग के दो त्रिभुज", "{c} रंग के तीन त्रिभुज"],
               "star": ["{c} रंग का एक तारा", "{c} रंग के दो तारे", "{c} रंग के तीन तारे"]},
        colors={"red": "लाल", "green": "हरे", "blue": "नीले", "yellow": "पीले", "purple": "बैंगनी", "orange": "नारंगी"},
        positions={"left": "बाईं ओर", "right": "दाईं ओर", "top": "ऊपर", "bottom": "नीचे", "center": "बीच में"},
        backgrounds={"light": "हल्की पृष्ठभूमि पर", "dark": "गहरी पृष्ठभूमि पर"},
        templates=["{p} {n}", "{bg} {p} {n}", "चित्र में {p} {n}"],
    ),
}
LANGUAGES = tuple(LANGS)  # the demo's nine

# Eleven more languages for the language-ID benchmark: close neighbours of the nine (uk~ru, pt~es,
# it~es/fr, nl~de, sv, pl, el, tr, vi, id~ms, ko) so confusions that cost real data show up.
LANGS.update({
    "it": dict(
        nouns={"circle": ["un cerchio {c}", "due cerchi {c}", "tre cerchi {c}"],
               "square": ["un quadrato {c}", "due quadrati {c}", "tre quadrati {c}"],
               "triangle": ["un triangolo {c}", "due triangoli {c}", "tre triangoli {c}"],
               "star": ["una stella {c}", "due stelle {c}", "tre stelle {c}"]},
        colors={"red": "di colore rosso", "green": "di colore verde", "blue": "di colore blu",
                "yellow": "di colore giallo", "purple": "di colore viola", "orange": "di colore arancione"},
        positions={"left": "a sinistra", "right": "a destra", "top": "in alto", "bottom": "in basso", "center": "al centro"},
        backgrounds={"light": "su sfondo chiaro", "dark": "su sfondo scuro"},
        templates=["{n} {p}", "{n} {p}, {bg}", "un'immagine con {n} {p}"],
    ),
    "pt": dict(
        nouns={"circle": ["um círculo {c}", "dois círculos {c}", "três círculos {c}"],
               "square": ["um quadrado {c}", "dois quadrados {c}", "três quadrados {c}"],
               "triangle": ["um triângulo {c}", "dois triângulos {c}", "três triângulos {c}"],
               "star": ["uma estrela {c}", "duas estrelas {c}", "três estrelas {c}"]},
        colors={"red": "de cor vermelha", "green": "de cor verde", "blue": "de cor azul",
                "yellow": "de cor amarela", "purple": "de cor roxa", "orange": "de cor laranja"},
        positions={"left": "à esquerda", "right": "à direita", "top": "em cima", "bottom": "embaixo", "center": "no centro"},
        backgrounds={"light": "sobre fundo claro", "dark": "sobre fundo escuro"},
        templates=["{n} {p}", "{n} {p}, {bg}", "uma imagem com {n} {p}"],
    ),
    "nl": dict(
        nouns={"circle": ["een cirkel in het {c}", "twee cirkels in het {c}", "drie cirkels in het {c}"],
               "square": ["een vierkant in het {c}", "twee vierkanten in het {c}", "drie vierkanten in het {c}"],
               "triangle": ["een driehoek in het {c}", "twee driehoeken in het {c}", "drie driehoeken in het {c}"],
               "star": ["een ster in het {c}", "twee sterren in het {c}", "drie sterren in het {c}"]},
        colors={"red": "rood", "green": "groen", "blue": "blauw", "yellow": "geel", "purple": "paars", "orange": "oranje"},
        positions={"left": "links", "right": "rechts", "top": "bovenaan", "bottom": "onderaan", "center": "in het midden"},
        backgrounds={"light": "op een lichte achtergrond", "dark": "op een donkere achtergrond"},
        templates=["{n} {p}", "{n} {p} {bg}", "een afbeelding met {n} {p}"],
    ),
    "pl": dict(
        nouns={"circle": ["jedno koło {c}", "dwa koła {c}", "trzy koła {c}"],
               "square": ["jeden kwadrat {c}", "dwa kwadraty {c}", "trzy kwadraty {c}"],
               "triangle": ["jeden trójkąt {c}", "dwa trójkąty {c}", "trzy trójkąty {c}"],
               "star": ["jedna gwiazda {c}", "dwie gwiazdy {c}", "trzy gwiazdy {c}"]},
        colors={"red": "w kolorze czerwonym", "green": "w kolorze zielonym", "blue": "w kolorze niebieskim",
                "yellow": "w kolorze żółtym", "purple": "w kolorze fioletowym", "orange": "w kolorze pomarańczowym"},
        positions={"left": "po lewej stronie", "right": "po prawej stronie", "top": "na górze", "bottom": "na dole", "center": "na środku"},
        backgrounds={"light": "na jasnym tle", "dark": "na ciemnym tle"},
        templates=["{n} {p}", "{n} {p} {bg}", "obraz: {n} {p}"],
    ),
    "tr": dict(
        nouns={"circle": ["bir {c} daire", "iki {c} daire", "üç {c} daire"],
               "square": ["bir {c} kare", "iki {c} kare", "üç {c} kare"],
               "triangle": ["bir {c} üçgen", "iki {c} üçgen", "üç {c} üçgen"],
               "star": ["bir {c} yıldız", "iki {c} yıldız", "üç {c} yıldız"]},
        colors={"red": "kırmızı", "green": "yeşil", "blue": "mavi", "yellow": "sarı", "purple": "mor", "orange": "turuncu"},
        positions={"left": "solda", "right": "sağda", "top": "üstte", "bottom": "altta", "center": "ortada"},
        backgrounds={"light": "açık renkli bir arka planda", "dark": "koyu renkli bir arka planda"},
        templates=["{p} {n}", "{bg} {p} {n}", "{p} {n} olan bir resim"],
    ),
    "ko": dict(
        nouns={"circle": ["{c} 원 한 개", "{c} 원 두 개", "{c} 원 세 개"],
               "square": ["{c} 사각형 한 개", "{c} 사각형 두 개", "{c} 사각형 세 개"],
               "triangle": ["{c} 삼각형 한 개", "{c} 삼각형 두 개", "{c} 삼각형 세 개"],
               "star": ["{c} 별 한 개", "{c} 별 두 개", "{c} 별 세 개"]},
        colors={"red": "빨간", "green": "초록색", "blue": "파란", "yellow": "노란", "purple": "보라색", "orange": "주황색"},
        positions={"left": "왼쪽에", "right": "오른쪽에", "top": "위쪽에", "bottom": "아래쪽에", "center": "가운데에"},
        backgrounds={"light": "밝은 배경의", "dark": "어두운 배경의"},
        templates=["{p} {n}", "{bg} 그림 {p} {n}", "이미지 {p} {n}"],
    ),
    "uk": dict(
        nouns={"circle": ["одне коло {c}", "два кола {c}", "три кола {c}"],
               "square": ["один квадрат {c}", "два квадрати {c}", "три квадрати {c}"],
               "triangle": ["один трикутник {c}", "два трикутники {c}", "три трикутники {c}"],
               "star": ["одна зірка {c}", "дві зірки {c}", "три зірки {c}"]},
        colors={"red": "червоного кольору", "green": "зеленого кольору", "blue": "синього кольору",
                "yellow": "жовтого кольору", "purple": "фіолетового кольору", "orange": "помаранчевого кольору"},
        positions={"left": "ліворуч", "right": "праворуч", "top": "угорі", "bottom": "унизу", "center": "у центрі"},
        backgrounds={"light": "на світлому тлі", "dark": "на темному тлі"},
        templates=["{n} {p}", "{n} {p} {bg}", "зображення: {n} {p}"],
    ),
    "vi": dict(
        nouns={"circle": ["một hình tròn {c}", "hai hình tròn {c}", "ba hình tròn {c}"],
               "square": ["một hình vuông {c}", "hai hình vuông {c}", "ba hình vuông {c}"],
               "triangle": ["một hình tam giác {c}", "hai hình tam giác {c}", "ba hình tam giác {c}"],
               "star": ["một ngôi sao {c}", "hai ngôi sao {c}", "ba ngôi sao {c}"]},
        colors={"red": "màu đỏ", "green": "màu xanh lá", "blue": "màu xanh dương", "yellow": "màu vàng",
                "purple": "màu tím", "orange": "màu cam"},
        positions={"left": "ở bên trái", "right": "ở bên phải", "top": "ở phía trên", "bottom": "ở phía dưới", "center": "ở giữa"},
        backgrounds={"light": "trên nền sáng", "dark": "trên nền tối"},
        templates=["{n} {p}", "{n} {p} {bg}", "hình ảnh có {n} {p}"],
    ),
    "id": dict(
        nouns={"circle": ["sebuah lingkaran {c}", "dua lingkaran {c}", "tiga lingkaran {c}"],
               "square": ["sebuah persegi {c}", "dua persegi {c}", "tiga persegi {c}"],
               "triangle": ["sebuah segitiga {c}", "dua segitiga {c}", "tiga segitiga {c}"],
               "star": ["sebuah bintang {c}", "dua bintang {c}", "tiga bintang {c}"]},
        colors={"red": "berwarna merah", "green": "berwarna hijau", "blue": "berwarna biru",
                "yellow": "berwarna kuning", "purple": "berwarna ungu", "orange": "berwarna oranye"},
        positions={"left": "di sebelah kiri", "right": "di sebelah kanan", "top": "di bagian atas",
                   "bottom": "di bagian bawah", "center": "di tengah"},
        backgrounds={"light": "dengan latar belakang terang", "dark": "dengan latar belakang gelap"},
        templates=["{n} {p}", "{n} {p} {bg}", "gambar dengan {n} {p}"],
    ),
    "sv": dict(
        nouns={"circle": ["en cirkel i {c}", "två cirklar i {c}", "tre cirklar i {c}"],
               "square": ["en kvadrat i {c}", "två kvadrater i {c}", "tre kvadrater i {c}"],
               "triangle": ["en triangel i {c}", "två trianglar i {c}", "tre trianglar i {c}"],
               "star": ["en stjärna i {c}", "två stjärnor i {c}", "tre stjärnor i {c}"]},
        colors={"red": "rött", "green": "grönt", "blue": "blått", "yellow": "gult", "purple": "lila", "orange": "orange"},
        positions={"left": "till vänster", "right": "till höger", "top": "upptill", "bottom": "nedtill", "center": "i mitten"},
        backgrounds={"light": "på ljus bakgrund", "dark": "på mörk bakgrund"},
        templates=["{n} {p}", "{n} {p} {bg}", "en bild med {n} {p}"],
    ),
    "el": dict(
        nouns={"circle": ["ένας κύκλος {c}", "δύο κύκλοι {c}", "τρεις κύκλοι {c}"],
               "square": ["ένα τετράγωνο {c}", "δύο τετράγωνα {c}", "τρία τετράγωνα {c}"],
               "triangle": ["ένα τρίγωνο {c}", "δύο τρίγωνα {c}", "τρία τρίγωνα {c}"],
               "star": ["ένα αστέρι {c}", "δύο αστέρια {c}", "τρία αστέρια {c}"]},
        colors={"red": "σε κόκκινο χρώμα", "green": "σε πράσινο χρώμα", "blue": "σε μπλε χρώμα",
                "yellow": "σε κίτρινο χρώμα", "purple": "σε μωβ χρώμα", "orange": "σε πορτοκαλί χρώμα"},
        positions={"left": "αριστερά", "right": "δεξιά", "top": "πάνω", "bottom": "κάτω", "center": "στο κέντρο"},
        backgrounds={"light": "σε ανοιχτόχρωμο φόντο", "dark": "σε σκούρο φόντο"},
        templates=["{n} {p}", "{n} {p} {bg}", "εικόνα με {n} {p}"],
    ),
})
ALL_LANGUAGES = tuple(LANGS)  # the nine and the eleven: 20


@dataclass(frozen=True)
class Scene:
    """What an image shows: the ground truth its captions describe."""

    shape: str
    color: str
    count: int
    position: str
    background: str
    seed: int

    @property
    def class_name(self) -> str:
        return f"{self.color} {self.shape}"


def classes() -> List[str]:
    """Zero-shot classes of the held-out classification set: colour x shape (24)."""
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def caption(scene: Scene, lang: str, variant: int) -> str:
    """One caption of a scene in a language; ``variant`` picks the paraphrase template."""
    L = LANGS[lang]
    noun = L["nouns"][scene.shape][scene.count - 1].format(c=L["colors"][scene.color])
    template = L["templates"][variant % len(L["templates"])]
    return template.format(n=noun, p=L["positions"][scene.position], bg=L["backgrounds"][scene.background])


def short_caption(scene: Scene, lang: str) -> str:
    """The scene's noun phrase alone ("три квадрата синего цвета"): the short captions language ID finds hardest."""
    L = LANGS[lang]
    return L["nouns"][scene.shape][scene.count - 1].format(c=L["colors"][scene.color])


def language_id_set(per_language: int, seed: int = 0,
                    languages: Sequence[str] = ALL_LANGUAGES) -> Iterator[Tuple[str, str, str]]:
    """(language, length kind, caption) for the language-ID benchmark: per language half full captions, half short."""
    rng = random.Random(seed)
    for lang in languages:
        for k in range(per_language):
            scene = random_scene(rng)
            if k % 2:
                yield lang, "short", short_caption(scene, lang)
            else:
                yield lang, "full", caption(scene, lang, rng.randrange(3))


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), count=rng.randint(1, 3),
        position=rng.choice(POSITIONS), background=rng.choice(BACKGROUNDS), seed=rng.getrandbits(31),
    )


_REGIONS = {  # (x0, y0, x1, y1) as fractions of the image: where the shapes' centres may fall
    "left": (0.05, 0.2, 0.35, 0.8), "right": (0.65, 0.2, 0.95, 0.8), "top": (0.2, 0.05, 0.8, 0.35),
    "bottom": (0.2, 0.65, 0.8, 0.95), "center": (0.35, 0.35, 0.65, 0.65),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # five-pointed star
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene: textured background, jittered colour, 1-3 shapes inside its region."""
    rng = np.random.default_rng(scene.seed)
    base = rng.integers(200, 245) if scene.background == "light" else rng.integers(20, 60)
    noise = rng.normal(0, 8, (size, size, 1)) + rng.normal(0, 3, (size, size, 3))
    if rng.random() < 0.5:  # stripes as a second texture
        stripes = (np.arange(size)[:, None] // rng.integers(3, 8)) % 2 * rng.integers(5, 15)
        noise = noise + stripes[..., None]
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    color = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLORS[scene.color])
    x0, y0, x1, y1 = (f * size for f in _REGIONS[scene.position])
    r = size * (0.11 if scene.count == 1 else 0.08) * rng.uniform(0.85, 1.15)
    if scene.count == 1:
        centres = [(rng.uniform(x0, x1), rng.uniform(y0, y1))]
    else:  # spread copies along the region's long side so they don't overlap
        horizontal = (x1 - x0) >= (y1 - y0)
        centres = []
        for k in range(scene.count):
            t = (k + 0.5) / scene.count
            if horizontal:
                centres.append((x0 + t * (x1 - x0), rng.uniform(y0, y1)))
            else:
                centres.append((rng.uniform(x0, x1), y0 + t * (y1 - y0)))
    for cx, cy in centres:
        _draw_shape(draw, scene.shape, cx, cy, r, color)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def samples(n: int, seed: int = 0, languages: Sequence[str] = LANGUAGES) -> Iterator[Tuple[Scene, str, str]]:
    """n (scene, language, caption) triples, languages drawn uniformly, paraphrases at random."""
    rng = random.Random(seed)
    for _ in range(n):
        scene = random_scene(rng)
        lang = rng.choice(list(languages))
        yield scene, lang, caption(scene, lang, rng.randrange(3))


def xm3600_items(n_images: int, seed: int = 1, size: int = 64, languages: Sequence[str] = LANGUAGES,
                 captions_per_image: Tuple[int, int] = (1, 3)) -> Iterator[Tuple[str, str, bytes, Dict[str, List[str]]]]:
    """A held-out retrieval split for the Crossmodal-3600 layout: (key, locale, JPEG, captions per language).

    ``sigscale.eval.xm3600.write_xm3600`` writes them as the official captions.jsonl + images/.
    """
    rng = random.Random(seed)
    for i in range(n_images):
        scene = random_scene(rng)
        key = f"{seed:02d}{i:08x}"
        buf = io.BytesIO()
        render(scene, size).save(buf, format="JPEG", quality=92)
        captions = {}
        for lang in languages:
            k = rng.randint(*captions_per_image)
            captions[lang] = [caption(scene, lang, v) for v in rng.sample(range(3), k)]
        yield key, languages[i % len(languages)], buf.getvalue(), captions


def class_images(per_class: int, seed: int = 2, size: int = 64) -> Iterator[Tuple[int, bytes]]:
    """(class index into :func:`classes`, JPEG bytes): ``per_class`` scenes of every class, class by class."""
    rng = random.Random(seed)
    for idx, name in enumerate(classes()):
        color, shape = name.split()
        for _ in range(per_class):
            scene = Scene(shape, color, rng.randint(1, 3), rng.choice(POSITIONS), rng.choice(BACKGROUNDS), rng.getrandbits(31))
            yield idx, jpeg_bytes(render(scene, size), quality=92)


def write_image_folder(out_dir: Path, per_class: int, seed: int = 2, size: int = 64) -> Path:
    """A held-out classification set in ImageFolder layout plus classnames.txt (one name per line)."""
    out_dir = Path(out_dir)
    counts: Dict[int, int] = {}
    for idx, jpeg in class_images(per_class, seed, size):
        d = out_dir / f"c{idx:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{counts.setdefault(idx, 0):05d}.jpg").write_bytes(jpeg)
        counts[idx] += 1
    (out_dir / "classnames.txt").write_text("\n".join(classes()) + "\n", encoding="utf-8")
    return out_dir


def class_names(lang: str) -> List[str]:
    """The :func:`classes` named in a language as its captions name one such shape ("ein Kreis in Rot")."""
    L = LANGS[lang]
    return [L["nouns"][name.split()[1]][0].format(c=L["colors"][name.split()[0]]) for name in classes()]


def class_prompts(lang: str) -> List[str]:
    """Zero-shot templates in a language, '{}' for the class: its caption templates at every position and background."""
    L = LANGS[lang]
    out = [t.format(n="{}", p=L["positions"][p], bg=L["backgrounds"][b])
           for t in L["templates"] for p in POSITIONS for b in BACKGROUNDS]
    return list(dict.fromkeys(out))  # templates without {bg} repeat per background: once each


def karpathy_items(n_images: int, seed: int = 4, size: int = 64, split: str = "test",
                   lang: str = "en") -> Iterator[Tuple[str, str, bytes, List[str]]]:
    """A held-out retrieval split for the COCO Karpathy layout: (split, file name, JPEG, captions).

    Four distinct captions per image (the three paraphrases and the bare noun phrase); ``sigscale.eval.karpathy.
    write_karpathy`` writes them as dataset_coco.json + images.
    """
    rng = random.Random(seed)
    for i in range(n_images):
        scene = random_scene(rng)
        caps = [caption(scene, lang, v) for v in range(3)] + [short_caption(scene, lang)]
        yield split, f"COCO_val2014_{seed:04d}{i:08d}.jpg", jpeg_bytes(render(scene, size), quality=92), caps


def shard_records(n: int, seed: int = 0, size: int = 64, languages: Sequence[str] = LANGUAGES) -> Iterator[dict]:
    """Generated samples in the shard record form of :func:`sigscale.core.manifest.write_shards`."""
    for i, (scene, lang, text) in enumerate(samples(n, seed, languages)):
        yield {"key": f"{seed:03d}{i:09d}", "jpg": jpeg_bytes(render(scene, size)), "txt": text,
               "json": {"language": lang, "class": scene.class_name, "position": scene.position,
                        "count": scene.count}}


def indexed_sample(seed: int, index: int, languages: Sequence[str] = LANGUAGES) -> Tuple[Scene, str, str]:
    """The (scene, language, caption) of one index, computable alone (a URL names its image by index)."""
    rng = random.Random(f"{seed}:{index}")  # str seeds hash with SHA-512: stable across runs and platforms
    scene = random_scene(rng)
    lang = rng.choice(list(languages))
    return scene, lang, caption(scene, lang, rng.randrange(3))
