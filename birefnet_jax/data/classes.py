"""DIS5K category names for the auxiliary classification head.

The official code (dataset.py, `class_labels_TR_sorted`) lists the 219 DIS5K-TR categories in
sorted order; a sample's class id is the position of the 4th `#`-separated field of its GT file
name (`'1#Accessories#1#Bag#2339506821_83cc4c7b13_o.png'.split('#')[3] == 'Bag'`).
The official code raises KeyError for an unknown name (and only looks when auxiliary
classification is on); here an unknown or missing name gives -1, the "no label" value the
official code uses when the head is off.
"""

import os

DIS_CLASS_NAMES = (
    'Airplane', 'Ant', 'Antenna', 'Archery', 'Axe', 'BabyCarriage', 'Bag', 'BalanceBeam',
    'Balcony', 'Balloon', 'Basket', 'BasketballHoop', 'Beatle', 'Bed', 'Bee', 'Bench', 'Bicycle',
    'BicycleFrame', 'BicycleStand', 'Boat', 'Bonsai', 'BoomLift', 'Bridge', 'BunkBed',
    'Butterfly', 'Button', 'Cable', 'CableLift', 'Cage', 'Camcorder', 'Cannon', 'Canoe', 'Car',
    'CarParkDropArm', 'Carriage', 'Cart', 'Caterpillar', 'CeilingLamp', 'Centipede', 'Chair',
    'Clip', 'Clock', 'Clothes', 'CoatHanger', 'Comb', 'ConcretePumpTruck', 'Crack', 'Crane',
    'Cup', 'DentalChair', 'Desk', 'DeskChair', 'Diagram', 'DishRack', 'DoorHandle', 'Dragonfish',
    'Dragonfly', 'Drum', 'Earphone', 'Easel', 'ElectricIron', 'Excavator', 'Eyeglasses', 'Fan',
    'Fence', 'Fencing', 'FerrisWheel', 'FireExtinguisher', 'Fishing', 'Flag', 'FloorLamp',
    'Forklift', 'GasStation', 'Gate', 'Gear', 'Goal', 'Golf', 'GymEquipment', 'Hammock',
    'Handcart', 'Handcraft', 'Handrail', 'HangGlider', 'Harp', 'Harvester', 'Headset',
    'Helicopter', 'Helmet', 'Hook', 'HorizontalBar', 'Hydrovalve', 'IroningTable', 'Jewelry',
    'Key', 'KidsPlayground', 'Kitchenware', 'Kite', 'Knife', 'Ladder', 'LaundryRack', 'Lightning',
    'Lobster', 'Locust', 'Machine', 'MachineGun', 'MagazineRack', 'Mantis', 'Medal',
    'MemorialArchway', 'Microphone', 'Missile', 'MobileHolder', 'Monitor', 'Mosquito',
    'Motorcycle', 'MovingTrolley', 'Mower', 'MusicPlayer', 'MusicStand', 'ObservationTower',
    'Octopus', 'OilWell', 'OlympicLogo', 'OperatingTable', 'OutdoorFitnessEquipment', 'Parachute',
    'Pavilion', 'Piano', 'Pipe', 'PlowHarrow', 'PoleVault', 'Punchbag', 'Rack', 'Racket', 'Rifle',
    'Ring', 'Robot', 'RockClimbing', 'Rope', 'Sailboat', 'Satellite', 'Scaffold', 'Scale',
    'Scissor', 'Scooter', 'Sculpture', 'Seadragon', 'Seahorse', 'Seal', 'SewingMachine', 'Ship',
    'Shoe', 'ShoppingCart', 'ShoppingTrolley', 'Shower', 'Shrimp', 'Signboard', 'Skateboarding',
    'Skeleton', 'Skiing', 'Spade', 'SpeedBoat', 'Spider', 'Spoon', 'Stair', 'Stand', 'Stationary',
    'SteeringWheel', 'Stethoscope', 'Stool', 'Stove', 'StreetLamp', 'SweetStand', 'Swing',
    'Sword', 'TV', 'Table', 'TableChair', 'TableLamp', 'TableTennis', 'Tank', 'Tapeline',
    'Teapot', 'Telescope', 'Tent', 'TobaccoPipe', 'Toy', 'Tractor', 'TrafficLight', 'TrafficSign',
    'Trampoline', 'TransmissionTower', 'Tree', 'Tricycle', 'TrimmerCover', 'Tripod', 'Trombone',
    'Truck', 'Trumpet', 'Tuba', 'UAV', 'Umbrella', 'UnevenBars', 'UtilityPole', 'VacuumCleaner',
    'Violin', 'Wakesurfing', 'Watch', 'WaterTower', 'WateringPot', 'Well', 'WellLid', 'Wheel',
    'Wheelchair', 'WindTurbine', 'Windmill', 'WineGlass', 'WireWhisk', 'Yacht',
)
assert len(DIS_CLASS_NAMES) == 219 and list(DIS_CLASS_NAMES) == sorted(DIS_CLASS_NAMES)

_CLASS_ID = {name: i for i, name in enumerate(DIS_CLASS_NAMES)}


def class_label_from_filename(path):
  """Official DIS5K class id of a GT (or image) file: `basename.split('#')[3]`, else -1."""
  fields = os.path.basename(str(path)).split('#')
  if len(fields) < 4:  # DIS5K names are id#group#id#Class#original_name
    return -1
  return _CLASS_ID.get(fields[3], -1)
